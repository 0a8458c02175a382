-- One replica's sync with the fleet, run atomically by Redis (see sync.py).
--
-- 0. Each call carries the replica's sync number. A call numbered at or below
--    the last one applied, or below the replica's fence (sync.py raises it
--    before re-sending deltas whose reply was lost), is an old call that
--    arrived late on a dead connection: it changes nothing and says so. So
--    every delta is applied at most once, and a lost one is re-sent under a
--    new number only once no older copy can land.
-- 1. Apply this call's deltas (new requests, dispatches, queue waits).
-- 2. Update this replica's map of active requests (only what changed), and
--    renew its lease. Replicas whose lease ran out are forgotten, with their
--    active requests and the slots they held (not their sync numbers: one that
--    was only cut off must not have a call applied twice when it returns).
-- 3. Fleet capacity (capacity > 0): share the slots among live replicas,
--    max-min fair by demand (in flight + queued), the rest evenly as headroom.
--    The replica may dispatch up to min(share, capacity - what the others
--    hold): its grant. It holds max(grant, in flight, the limit it uses until
--    this reply arrives): requests already in flight past the grant are a
--    reservation the others must respect, but no licence to dispatch more, so
--    a backlogged replica drains down to its share; and if this reply is lost
--    the replica goes on under its old limit, which its holding covers. Each
--    grant is computed against the others' holdings, each holding is at least
--    its grant, so the grants recorded never sum past capacity, nor do the
--    limits in force while every replica's lease holds.
--    That holds across a loss of Redis's data too (restart without persistence,
--    failover to an empty or older copy), which forgets every holding while the
--    replicas' leases still run: a replica that saw a newer version than Redis
--    has, or synced before and has no sync number here, reveals the loss, and
--    for one lease from then no replica is granted more than the limit it was
--    using (it sends it), so the limits can only shrink until every lease
--    granted before the loss has ended.
-- 4. Return the grant, the live replica count, and the workloads changed since
--    the version this replica last saw (every workload when it saw none, when
--    forgotten workloads it has not heard of were pruned since, or after a loss
--    of Redis's data, so the replica drops its stale view and reloads): their
--    fleet-wide counters, rate-window counters (the replica computes the rate
--    as time passes), and the active requests of the *other* replicas.
--    A sync costs O(changes + live replicas), not O(workloads).
--
-- All times are Redis's own clock, in ms, so replicas' clocks never disagree.
-- ARGV: prefix, replica, lease_ms, capacity, demand, in_flight, rate_window_ms,
--       ema_alpha, idle_ttl_ms, seq, deltas JSON {id: [new, dispatched, [waits]]},
--       active JSON {id: n}, since (version last seen; -1: none), limit in force
local P, me = ARGV[1], ARGV[2]
local lease, capacity = tonumber(ARGV[3]), tonumber(ARGV[4])
local demand, in_flight = tonumber(ARGV[5]), tonumber(ARGV[6])
local window, alpha, idle = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local seq, since, using = tonumber(ARGV[10]), tonumber(ARGV[13]), tonumber(ARGV[14])
local WORKLOADS, REPLICAS = P .. ':workloads', P .. ':replicas'
local HELD, GRANT, DEMAND = P .. ':held', P .. ':grant', P .. ':demand'
local SEQ, FENCE = P .. ':seq', P .. ':fence'
local ACTIVE, CHANGED, GONE = P .. ':active-total', P .. ':changed', P .. ':gone'
local VERSION, FLOOR, RESET = P .. ':version', P .. ':floor', P .. ':reset-until'

-- 0. late calls change nothing
local last = tonumber(redis.call('HGET', SEQ, me) or '-1')
local fence = tonumber(redis.call('HGET', FENCE, me) or '-1')
if seq <= last or seq <= fence then return {-1} end
redis.call('HSET', SEQ, me, seq)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local version = redis.call('INCR', VERSION)
-- Redis lost its data (restarted empty, failed over to an empty or older copy)
-- if this replica saw a version it does not have, or synced before and has no
-- sync number here. The replicas' leases granted before still hold, for at most
-- one lease: until then, no grant above the limit a replica already uses.
local reset = since >= version or (since >= 0 and last < 0)
local cautious_until = tonumber(redis.call('GET', RESET) or '0')
if reset and now >= cautious_until then
  cautious_until = now + lease
  redis.call('SET', RESET, cautious_until)
end
local cautious = now < cautious_until
local function touch(id) redis.call('ZADD', CHANGED, version, id) end

-- The sliding-window rate of extproc/registry/rate.py, on hash fields st bs cur prev.
local function roll(h)
  local elapsed = now - h.bs
  if elapsed < window then return end
  if elapsed < 2 * window then
    h.prev, h.cur, h.bs = h.cur, 0, h.bs + window
  else
    h.prev, h.cur, h.st, h.bs = 0, 0, now, now
  end
end

local function counters(f)
  return {st = tonumber(f[1]) or now, bs = tonumber(f[2]) or now,
          cur = tonumber(f[3]) or 0, prev = tonumber(f[4]) or 0}
end

-- 1. deltas
for id, d in pairs(cjson.decode(ARGV[11])) do
  local key = P .. ':w:' .. id
  local f = redis.call('HMGET', key, 'st', 'bs', 'cur', 'prev', 'ema', 'dispatched')
  local h = counters(f)
  roll(h)
  h.cur = h.cur + d[1]
  local ema, seen = tonumber(f[5]), tonumber(f[6]) or 0
  for _, wait in ipairs(d[3]) do
    if seen == 0 or ema == nil then ema = wait else ema = ema + alpha * (wait - ema) end
    seen = seen + 1
  end
  redis.call('HSET', key, 'st', h.st, 'bs', h.bs, 'cur', h.cur, 'prev', h.prev)
  if ema ~= nil then redis.call('HSET', key, 'ema', string.format('%.9g', ema)) end
  redis.call('HINCRBY', key, 'total', d[1])
  redis.call('HINCRBY', key, 'dispatched', d[2])
  redis.call('ZADD', WORKLOADS, now, id)
  touch(id)
end

-- 2. active requests (the fleet's sum per workload kept alongside) and leases
local function add_active(id, n)
  if redis.call('HINCRBY', ACTIVE, id, n) <= 0 then redis.call('HDEL', ACTIVE, id) end
  touch(id)
end
local mine_key = P .. ':active:' .. me
local before, mine = {}, {}
local old = redis.call('HGETALL', mine_key)
for i = 1, #old, 2 do before[old[i]] = tonumber(old[i + 1]) end
for id, n in pairs(cjson.decode(ARGV[12])) do
  mine[id] = n
  if n ~= before[id] then
    add_active(id, n - (before[id] or 0))
    redis.call('HSET', mine_key, id, n)
  end
  before[id] = nil
  redis.call('ZADD', WORKLOADS, now, id)
end
for id, n in pairs(before) do
  add_active(id, -n)
  redis.call('HDEL', mine_key, id)
end
redis.call('ZADD', REPLICAS, now + lease, me)
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', REPLICAS, '-inf', '(' .. now)) do
  local held = redis.call('HGETALL', P .. ':active:' .. dead)
  for i = 1, #held, 2 do add_active(held[i], -tonumber(held[i + 1])) end
  redis.call('DEL', P .. ':active:' .. dead)
  redis.call('HDEL', HELD, dead)
  redis.call('HDEL', GRANT, dead)
  redis.call('HDEL', DEMAND, dead)
  redis.call('ZREM', REPLICAS, dead)
end
local live = redis.call('ZRANGE', REPLICAS, 0, -1)

-- 3. fleet capacity
local granted = 0
if capacity > 0 then
  redis.call('HSET', DEMAND, me, demand)
  local wants, others_held = {}, 0
  for i, r in ipairs(live) do
    wants[i] = {r = r, d = tonumber(redis.call('HGET', DEMAND, r) or '0')}
    if r ~= me then others_held = others_held + tonumber(redis.call('HGET', HELD, r) or '0') end
  end
  table.sort(wants, function(a, b) return a.d < b.d end)
  local left, share = capacity, {}
  for i, w in ipairs(wants) do
    local give = math.min(w.d, math.floor(left / (#wants - i + 1)))
    share[w.r] = give
    left = left - give
  end
  table.sort(live)
  local each, extra = math.floor(left / #live), left % #live
  for i, r in ipairs(live) do
    share[r] = share[r] + each + ((i <= extra) and 1 or 0)
  end
  granted = math.max(0, math.min(share[me], capacity - others_held))
  if cautious then granted = math.min(granted, using) end
  redis.call('HSET', GRANT, me, granted)
  redis.call('HSET', HELD, me, math.max(granted, in_flight, using))
end

-- 4. idle workloads with nothing active are forgotten (a tombstone tells the
-- replicas); tombstones older than the idle TTL are pruned, and a replica that
-- last synced before the newest pruned one gets everything again.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', WORKLOADS, '-inf', '(' .. (now - idle))) do
  redis.call('DEL', P .. ':w:' .. id)
  redis.call('ZREM', WORKLOADS, id)
  redis.call('ZADD', GONE, now, id)
  touch(id)
end
local floor = tonumber(redis.call('GET', FLOOR) or '0')
for _, id in ipairs(redis.call('ZRANGEBYSCORE', GONE, '-inf', '(' .. (now - idle))) do
  if not redis.call('ZSCORE', WORKLOADS, id) then
    floor = math.max(floor, tonumber(redis.call('ZSCORE', CHANGED, id)))
    redis.call('ZREM', CHANGED, id)
  end
  redis.call('ZREM', GONE, id)
end
redis.call('SET', FLOOR, floor)

local full = since < floor or reset
local ids
if full then
  ids = redis.call('ZRANGE', WORKLOADS, 0, -1)
else
  ids = redis.call('ZRANGEBYSCORE', CHANGED, '(' .. since, '+inf')
end
local out = {granted, #live, version, full and 1 or 0, now}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', P .. ':w:' .. id, 'st', 'bs', 'cur', 'prev', 'ema', 'total', 'dispatched')
  out[#out + 1] = id
  if f[6] then
    local h = counters(f)
    roll(h)
    local all = tonumber(redis.call('HGET', ACTIVE, id) or '0')
    out[#out + 1] = tonumber(f[6])
    out[#out + 1] = tonumber(f[7]) or 0
    out[#out + 1] = f[5] or '0'
    out[#out + 1] = h.st
    out[#out + 1] = h.bs
    out[#out + 1] = h.cur
    out[#out + 1] = h.prev
    out[#out + 1] = all - (mine[id] or 0)
  else
    for _ = 1, 8 do out[#out + 1] = -1 end  -- forgotten
  end
end
return out
