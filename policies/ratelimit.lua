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
--
-- Written for its cost inside redis-server, which every admitted request waits for: no tables or
-- string building beyond what the decision needs, the three buckets indexed by j (1 tpm, 2 rpm,
-- 3 tpd: the order of the hash fields and of the packed caps), integers formatted as integers
-- (%.17g goes through the C library's exact float printing). Callgrind, one scope with tpm + rpm,
-- Redis 6.2: 194 k -> 151 k instructions per reserve; the five redis.call()s are most of the rest.
local MARGIN = 1000
local F = { 't', 'r', 'd' }
local FS = { 'ts', 'rs', 'ds' }
local WINDOW = { 60000, 60000, 86400000 }
local floor, ceil, fmt, tonumber = math.floor, math.ceil, string.format, tonumber

local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[2])
end
local nscopes = #KEYS / 2

-- %.17g round-trips every double; for an integer it prints the same digits as %d, at a tenth of the cost.
local function num(x)
  if x == floor(x) and x > -1e15 and x < 1e15 then return fmt('%d', x) end
  return fmt('%.17g', x)
end

local function caps_of(packed)
  local a, b, c, d = string.match(packed, '^([^:]*):([^:]*):([^:]*):([^:]*)')
  return { tonumber(a), tonumber(b), tonumber(c) }, tonumber(d)
end

-- The levels of a bucket hash at now: l[j] for each bucket j the caps have (nil for the others).
-- A missing level reads as full; a level without a timestamp as stamped now.
local function levels_at(key, caps)
  local v = redis.call('HMGET', key, 't', 'ts', 'r', 'rs', 'd', 'ds')
  local l = {}
  for j = 1, 3 do
    local cap = caps[j]
    if cap > 0 then
      local level = v[2 * j - 1]
      if level then
        level = tonumber(level)
        local ts = v[2 * j]
        local elapsed = ts and now - tonumber(ts) or 0
        if elapsed > 0 then level = level + elapsed * cap / WINDOW[j] end
        if level > cap then level = cap end
        l[j] = level
      else
        l[j] = cap
      end
    end
  end
  return l
end

-- A bucket hash lives until every level in it would be full again, plus a margin: a missing hash
-- reads as full buckets, so its expiry must change no decision. Levels read but not written count
-- too (settlement writes no request level, and must not cut the TTL reserve set for it).
local function until_full(caps, l)
  local t = 0
  for j = 1, 3 do
    local level = l[j]
    if level ~= nil then
      local full = (caps[j] - level) * WINDOW[j] / caps[j]
      if full > t then t = full end
    end
  end
  return t
end

-- Give an existing key at least ttl ms more, never less than it has: a longer TTL was set for a level
-- or a lease this call cannot see (another configuration, another gateway version). PTTL, not
-- PEXPIRE GT: GT needs Redis 7 and treats a key without TTL as never expiring.
local function keep(key, ttl)
  ttl = ceil(ttl)
  local left = redis.call('PTTL', key)
  if left ~= -2 and left < ttl then redis.call('PEXPIRE', key, ttl) end
end

-- Store the levels of `l` (but the request level when `skip_requests`: settlement never writes it),
-- stamped now; `l` holds every level the scope has at now (written or not), for the TTL.
local function store(key, caps, l, skip_requests)
  local stamp = num(now)
  local t, r, d = l[1], l[2], l[3]
  if skip_requests then r = nil end
  if t ~= nil and r ~= nil and d ~= nil then
    redis.call('HSET', key, 't', num(t), 'ts', stamp, 'r', num(r), 'rs', stamp, 'd', num(d), 'ds', stamp)
  elseif t ~= nil and r ~= nil then
    redis.call('HSET', key, 't', num(t), 'ts', stamp, 'r', num(r), 'rs', stamp)
  else
    local args, n = {}, 0
    for j = 1, 3 do
      local level = l[j]
      if level ~= nil and not (skip_requests and j == 2) then
        args[n + 1], args[n + 2], args[n + 3], args[n + 4] = F[j], num(level), FS[j], stamp
        n = n + 4
      end
    end
    if n == 0 then return end
    redis.call('HSET', key, unpack(args))
  end
  keep(key, MARGIN + until_full(caps, l))
end

if ARGV[1] == 'settle' then
  local a = 3
  for i = 1, nscopes do
    local caps, conc = caps_of(ARGV[a])
    local n = tonumber(ARGV[a + 1])
    a = a + 2
    local bucket = KEYS[2 * i - 1]
    local l = levels_at(bucket, caps)
    local t, d, ct, cd = l[1], l[3], caps[1], caps[3]
    local rids = {}
    for e = 1, n do
      local cost, actual = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
      rids[e] = ARGV[a]
      a = a + 3
      if t ~= nil then
        t = t + (cost < ct and cost or ct) - actual
        if t > ct then t = ct end
      end
      if d ~= nil then
        d = d + (cost < cd and cost or cd) - actual
        if d > cd then d = cd end
      end
    end
    l[1], l[3] = t, d
    store(bucket, caps, l, true)
    if conc > 0 then redis.call('ZREM', KEYS[2 * i], unpack(rids)) end
  end
  return 1
end

local rid = ARGV[3]
local lease = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])

local allowed, retry, failed_scope, failed_kind = true, 0, -1, ''
local all_levels, all_caps = {}, {}
for i = 1, nscopes do
  local caps, conc = caps_of(ARGV[5 + i])
  local l = levels_at(KEYS[2 * i - 1], caps)
  for j = 1, 3 do
    local level = l[j]
    if level ~= nil then
      local cap = caps[j]
      local need = 1
      if j ~= 2 then need = cost < cap and cost or cap end
      if level < need then
        local wait = (need - level) * WINDOW[j] / cap
        if wait > retry then retry = wait end
        if allowed then failed_scope, failed_kind = i - 1, F[j] end
        allowed = false
      end
    end
  end
  if conc > 0 then
    local slots = KEYS[2 * i]
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', num(now))
    if redis.call('ZCARD', slots) >= conc then
      if 1000 > retry then retry = 1000 end
      if allowed then failed_scope, failed_kind = i - 1, 'c' end
      allowed = false
    end
  end
  all_levels[i], all_caps[i] = l, { caps, conc }
end

if allowed then
  for i = 1, nscopes do
    local caps, conc = all_caps[i][1], all_caps[i][2]
    local l = all_levels[i]
    for j = 1, 3 do
      local level = l[j]
      if level ~= nil then
        if j == 2 then l[j] = level - 1
        else
          local cap = caps[j]
          l[j] = level - (cost < cap and cost or cap)
        end
      end
    end
    store(KEYS[2 * i - 1], caps, l, false)
    if conc > 0 then
      redis.call('ZADD', KEYS[2 * i], num(now + lease), rid)
      keep(KEYS[2 * i], lease)
    end
  end
else
  -- Nothing written, but a TTL cut short elsewhere (an older gateway's settlement, see
  -- docs/policies.md "Rolling upgrades") is restored by every refusal that reads the bucket.
  for i = 1, nscopes do
    keep(KEYS[2 * i - 1], MARGIN + until_full(all_caps[i][1], all_levels[i]))
  end
end

-- The headers describe the tightest bucket: the one with the least left.
local rl, rc, tl, tc, tw
for i = 1, nscopes do
  local caps, l = all_caps[i][1], all_levels[i]
  local level = l[2]
  if level ~= nil and (rl == nil or level < rl) then rl, rc = level, caps[2] end
  for j = 1, 3, 2 do
    level = l[j]
    if level ~= nil and (tl == nil or level < tl) then tl, tc, tw = level, caps[j], WINDOW[j] end
  end
end
local function floor0(x) local v = floor(x); if v < 0 then return 0 end; return v end
local lr, rr, sr, lt, rt, st = -1, -1, -1, -1, -1, -1
if rl ~= nil then lr, rr, sr = rc, floor0(rl), ceil((rc - rl) * 60000 / rc) end
if tl ~= nil then lt, rt, st = tc, floor0(tl), ceil((tc - tl) * tw / tc) end
local retry_ms = 0
if not allowed then retry_ms = ceil(retry) end
return { allowed and 1 or 0, retry_ms, failed_scope, failed_kind, lr, rr, sr, lt, rt, st }
