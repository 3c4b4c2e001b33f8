-- Create a conversation (ARGV[2] = its JSON) or append to one (ARGV[2] = ''), with its items.
-- KEYS: meta, order, items
-- ARGV: ttl ms, meta JSON or '', max items, n, id1, item1, ...
-- Returns 'ok' | 'missing' | 'full'
local ttl = tonumber(ARGV[1])
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
elseif redis.call('EXISTS', KEYS[1]) == 0 then
  return 'missing'
end
local n = tonumber(ARGV[4])
if redis.call('LLEN', KEYS[2]) + n > tonumber(ARGV[3]) then return 'full' end
for i = 0, n - 1 do
  redis.call('HSET', KEYS[3], ARGV[5 + 2 * i], ARGV[6 + 2 * i])
  redis.call('RPUSH', KEYS[2], ARGV[5 + 2 * i])
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
return 'ok'
