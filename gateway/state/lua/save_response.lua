-- Commit one response: append its items to its conversation (if any) and store it (if asked),
-- atomically, so no id is ever referenced without the object it names.
-- KEYS: response [, conversation meta, order, items, lock]
-- ARGV: ttl ms, store '1'|'0', obj, input, output, prev id, lock token, max items, n, id1, item1, ...
-- Returns 'ok' | 'missing' (conversation deleted meanwhile) | 'locked' (lock lost) | 'full'
local ttl = tonumber(ARGV[1])
if #KEYS > 1 then
  local meta, order, items, lock = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
  local held = redis.call('GET', lock)
  if held == ARGV[7] then redis.call('DEL', lock) end
  if redis.call('EXISTS', meta) == 0 then return 'missing' end
  if held ~= ARGV[7] then return 'locked' end
  local n = tonumber(ARGV[9])
  if redis.call('LLEN', order) + n > tonumber(ARGV[8]) then return 'full' end
  for i = 0, n - 1 do
    redis.call('HSET', items, ARGV[10 + 2 * i], ARGV[11 + 2 * i])
    redis.call('RPUSH', order, ARGV[10 + 2 * i])
  end
  for _, k in ipairs({meta, order, items}) do redis.call('PEXPIRE', k, ttl) end
end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'obj', ARGV[3], 'input', ARGV[4], 'output', ARGV[5], 'prev', ARGV[6])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 'ok'
