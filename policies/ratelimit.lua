-- One admission decision, or one batch of settlements, over the budgets of one tenant, atomically.
-- A port of policies/bucket.py's decide/settle; keep the two in step (tests compare them).
--
-- KEYS: per scope, its bucket hash then its slots sorted set; all share one {hash tag}.
-- ARGV[1] mode, ARGV[2] now in ms ("" = this server's TIME), then
--   reserve: request id, lease ms, tokens, then per scope "tpm:rpm:tpd:concurrency" (0 = none;
--            one argument per scope because the client's encoding of arguments is what costs most);
--   settle:  per scope "tpm:rpm:tpd:concurrency", a count n, then n triples (request id, reserved,
--            actual). The triples are applied in order at one instant, exactly as n settle() calls in
--            bucket.py at that instant, but the bucket is read and written once (the gateway batches).
local MINUTE, DAY = 60000, 86400000
local KINDS = { { 't', MINUTE }, { 'r', MINUTE }, { 'd', DAY } }

local mode = ARGV[1]
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[2])
end
local nscopes = #KEYS / 2

local function num(x) return string.format('%.17g', x) end

local function parse_caps(packed)
  local caps = {}
  for v in string.gmatch(packed, '[^:]+') do caps[#caps + 1] = tonumber(v) end
  return caps
end

local function level_at(level, ts, cap, window)
  if level == nil then return cap end
  if ts == nil then ts = now end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end
  local l = level + elapsed * cap / window
  if l > cap then l = cap end
  return l
end

local function need(kind, c, cap)
  if kind == 'r' then return 1 end
  if c < cap then return c end
  return cap
end

local function read(key)
  local v = redis.call('HMGET', key, 't', 'ts', 'r', 'rs', 'd', 'ds')
  return { t = tonumber(v[1]), ts = tonumber(v[2]), r = tonumber(v[3]), rs = tonumber(v[4]),
           d = tonumber(v[5]), ds = tonumber(v[6]) }
end

-- A bucket hash lives until every level in it would be full again, plus a margin: a missing hash
-- reads as full buckets, so its expiry must change no decision. Levels read but not written count
-- too (settlement writes no request level, and must not cut the TTL reserve set for it).
local MARGIN = 1000

local function until_full(caps, levels)
  local t = 0
  for j, k in ipairs(KINDS) do
    local l = levels[k[1]]
    if l ~= nil then
      local full = (caps[j] - l) * k[2] / caps[j]
      if full > t then t = full end
    end
  end
  return t
end

-- Give an existing key at least ttl ms more, never less than it has: a longer TTL was set for a level
-- or a lease this call cannot see (another configuration, another gateway version). PTTL, not
-- PEXPIRE GT: GT needs Redis 7 and treats a key without TTL as never expiring.
local function keep(key, ttl)
  ttl = math.ceil(ttl)
  local left = redis.call('PTTL', key)
  if left ~= -2 and left < ttl then redis.call('PEXPIRE', key, ttl) end
end

-- Store the levels written, stamped now; `all` is every level the scope has at now (written or not).
local function write(key, caps, levels, all)
  local args = {}
  for _, k in ipairs(KINDS) do
    local f = k[1]
    if levels[f] ~= nil then
      table.insert(args, f); table.insert(args, num(levels[f]))
      table.insert(args, f .. 's'); table.insert(args, num(now))
    end
  end
  if #args > 0 then
    redis.call('HSET', key, unpack(args))
    keep(key, MARGIN + until_full(caps, all))
  end
end

if mode == 'settle' then
  local a = 3
  for i = 1, nscopes do
    local caps, n = parse_caps(ARGV[a]), tonumber(ARGV[a + 1])
    a = a + 2
    local h = read(KEYS[2 * i - 1])
    local levels, all = {}, {}
    for j, k in ipairs(KINDS) do
      local f = k[1]
      if caps[j] > 0 then
        all[f] = level_at(h[f], h[f .. 's'], caps[j], k[2])
        if f ~= 'r' then levels[f] = all[f] end
      end
    end
    local rids = {}
    for e = 1, n do
      local cost, actual = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
      rids[e] = ARGV[a]
      a = a + 3
      for j, k in ipairs(KINDS) do
        local f = k[1]
        if levels[f] ~= nil then
          local l = levels[f] + need(f, cost, caps[j]) - actual
          if l > caps[j] then l = caps[j] end
          levels[f] = l
          all[f] = l
        end
      end
    end
    write(KEYS[2 * i - 1], caps, levels, all)
    if caps[4] > 0 then redis.call('ZREM', KEYS[2 * i], unpack(rids)) end
  end
  return 1
end

local rid = ARGV[3]
local lease = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])

local allowed, retry, failed_scope, failed_kind = true, 0, -1, ''
local all_levels, all_caps = {}, {}
for i = 1, nscopes do
  local caps = parse_caps(ARGV[5 + i])
  local h = read(KEYS[2 * i - 1])
  local got = {}
  for j, k in ipairs(KINDS) do
    local f = k[1]
    local cap = caps[j]
    if cap > 0 then
      local l = level_at(h[f], h[f .. 's'], cap, k[2])
      got[f] = l
      local n = need(f, cost, cap)
      if l < n then
        local wait = (n - l) * k[2] / cap
        if wait > retry then retry = wait end
        if allowed then failed_scope, failed_kind = i - 1, f end
        allowed = false
      end
    end
  end
  if caps[4] > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', num(now))
    if redis.call('ZCARD', KEYS[2 * i]) >= caps[4] then
      if 1000 > retry then retry = 1000 end
      if allowed then failed_scope, failed_kind = i - 1, 'c' end
      allowed = false
    end
  end
  all_levels[i], all_caps[i] = got, caps
end

if allowed then
  for i = 1, nscopes do
    local caps, got = all_caps[i], all_levels[i]
    for j, k in ipairs(KINDS) do
      local f = k[1]
      if got[f] ~= nil then got[f] = got[f] - need(f, cost, caps[j]) end
    end
    write(KEYS[2 * i - 1], caps, got, got)
    if caps[4] > 0 then
      redis.call('ZADD', KEYS[2 * i], num(now + lease), rid)
      keep(KEYS[2 * i], lease)
    end
  end
else
  -- Nothing written, but a TTL cut short elsewhere (an older gateway's settlement, see
  -- docs/policies.md "Rolling upgrades") is restored by every refusal that reads the bucket.
  for i = 1, nscopes do
    keep(KEYS[2 * i - 1], MARGIN + until_full(all_caps[i], all_levels[i]))
  end
end

-- The headers describe the tightest bucket: the one with the least left.
local req, tok
for i = 1, nscopes do
  local caps, got = all_caps[i], all_levels[i]
  for j, k in ipairs(KINDS) do
    local f = k[1]
    local l = got[f]
    if l ~= nil then
      local reset = (caps[j] - l) * k[2] / caps[j]
      if f == 'r' then
        if req == nil or l < req[1] then req = { l, caps[j], reset } end
      elseif tok == nil or l < tok[1] then
        tok = { l, caps[j], reset }
      end
    end
  end
end
local function floor0(x) local v = math.floor(x); if v < 0 then return 0 end; return v end
local lr, rr, sr, lt, rt, st = -1, -1, -1, -1, -1, -1
if req ~= nil then lr, rr, sr = req[2], floor0(req[1]), math.ceil(req[3]) end
if tok ~= nil then lt, rt, st = tok[2], floor0(tok[1]), math.ceil(tok[3]) end
local retry_ms = 0
if not allowed then retry_ms = math.ceil(retry) end
return { allowed and 1 or 0, retry_ms, failed_scope, failed_kind, lr, rr, sr, lt, rt, st }
