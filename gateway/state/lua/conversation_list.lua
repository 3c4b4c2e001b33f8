-- One page of a conversation's items.
-- KEYS: meta, order, items
-- ARGV: after id or '', limit, 'asc'|'desc'
-- Returns {'ok', has_more 0|1, item, ...} | {'missing'} | {'no_after'}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
local i, step, stop = 1, 1, #ids
if ARGV[3] == 'desc' then i, step, stop = #ids, -1, 1 end
if ARGV[1] ~= '' then
  local found
  for j = 1, #ids do if ids[j] == ARGV[1] then found = j break end end
  if not found then return {'no_after'} end
  i = found + step
end
local limit = tonumber(ARGV[2])
local out = {'ok', 0}
while (step == 1 and i <= stop) or (step == -1 and i >= stop) do
  if #out - 2 >= limit then out[2] = 1 break end
  local item = redis.call('HGET', KEYS[3], ids[i])
  if item then out[#out + 1] = item end
  i = i + step
end
return out
