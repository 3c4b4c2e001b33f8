-- Take a conversation for one response: hold its lock and read its items in order.
-- KEYS: meta, order, items, lock
-- ARGV: lock token, lock ms, ttl ms
-- Returns {'ok', item, item, ...} | {'missing'} | {'locked'}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if not redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'locked'} end
local ttl = tonumber(ARGV[3])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
local out = {'ok'}
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local item = redis.call('HGET', KEYS[3], id)
  if item then out[#out + 1] = item end
end
return out
