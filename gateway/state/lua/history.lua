-- Walk a previous_response_id chain, newest first, renewing each link's TTL.
-- KEYS[1]: the first response's key (the rest share its hash tag: same thread, same slot)
-- ARGV: key prefix, first id, ttl ms, max links
-- Returns {'ok', input, output, input, output, ...} | {'missing', id} | {'long'}
local prefix, id, ttl, max_links = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {'ok'}
for _ = 1, max_links do
  local key = prefix .. id
  local v = redis.call('HMGET', key, 'input', 'output', 'prev')
  if not v[1] then return {'missing', id} end
  redis.call('PEXPIRE', key, ttl)
  out[#out + 1] = v[1]
  out[#out + 1] = v[2]
  if not v[3] or v[3] == '' then return out end
  id = v[3]
end
return {'long'}
