-- Remove one item from a conversation.
-- KEYS: meta, order, items
-- ARGV: item id
-- Returns meta JSON | 'missing' (no conversation) | 'no_item'
local meta = redis.call('GET', KEYS[1])
if not meta then return 'missing' end
if redis.call('HDEL', KEYS[3], ARGV[1]) == 0 then return 'no_item' end
redis.call('LREM', KEYS[2], 1, ARGV[1])
return meta
