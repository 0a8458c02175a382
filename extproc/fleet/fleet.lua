-- One replica's sync with the fleet, run atomically by Redis (see fleet.py).
--
-- 1. Apply this replica's batches of deltas (new requests, dispatches, queue
--    waits), each once: a batch whose reply was lost is sent again under its
--    own sequence number, and numbers already applied are skipped.
-- 2. Replace this replica's map of active requests, and renew its lease.
--    Replicas whose lease ran out are forgotten, with their active requests and
--    the capacity slots they held (not their sequence numbers: one that was
--    only cut off must not have a batch applied twice when it returns).
-- 3. Fleet capacity (capacity > 0): share the slots among live replicas,
--    max-min fair by demand (in flight + queued), the rest evenly as headroom.
--    A replica is granted at most what the others leave free, and keeps at
--    least what it has in flight; so the slots held never sum past capacity.
-- 4. Return the slots granted, the live replica count, and every workload's
--    fleet-wide counters, with the active requests of the *other* replicas.
--
-- All times are Redis's own clock, in ms, so replicas' clocks never disagree.
-- ARGV: prefix, replica, lease_ms, capacity, demand, in_flight,
--       rate_window_ms, ema_alpha, idle_ttl_ms, batches JSON, active JSON
--       batches: [[seq, {id: [new, dispatched, [waits...]]}], ...] in seq order
local P, me = ARGV[1], ARGV[2]
local lease, capacity = tonumber(ARGV[3]), tonumber(ARGV[4])
local demand, in_flight = tonumber(ARGV[5]), tonumber(ARGV[6])
local window, alpha, idle = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local WORKLOADS, REPLICAS = P .. ':workloads', P .. ':replicas'
local HELD, DEMAND, SEQ = P .. ':held', P .. ':demand', P .. ':seq'

-- The sliding-window request rate of extproc/registry/rate.py, on hash fields st bs cur prev.
local function roll(h)
  local elapsed = now - h.bs
  if elapsed < window then return end
  if elapsed < 2 * window then
    h.prev, h.cur, h.bs = h.cur, 0, h.bs + window
  else
    h.prev, h.cur, h.st, h.bs = 0, 0, now, now
  end
end

local function rate(h)
  roll(h)
  local age = now - h.st
  if age < window then return h.cur * 1000 / math.max(age, math.min(1000, window)) end
  return (h.prev * (1 - (now - h.bs) / window) + h.cur) * 1000 / window
end

local function counters(f)
  return {st = tonumber(f[1]) or now, bs = tonumber(f[2]) or now,
          cur = tonumber(f[3]) or 0, prev = tonumber(f[4]) or 0}
end

-- 1. batches of deltas
local function apply(deltas)
  for id, d in pairs(deltas) do
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
  end
end
local last = tonumber(redis.call('HGET', SEQ, me) or '-1')
for _, batch in ipairs(cjson.decode(ARGV[10])) do
  if batch[1] > last then
    apply(batch[2])
    last = batch[1]
  end
end
redis.call('HSET', SEQ, me, last)

-- 2. this replica's active requests and lease; forget the dead
local mine_key = P .. ':active:' .. me
redis.call('DEL', mine_key)
for id, n in pairs(cjson.decode(ARGV[11])) do
  redis.call('HSET', mine_key, id, n)
  redis.call('ZADD', WORKLOADS, now, id)
end
redis.call('ZADD', REPLICAS, now + lease, me)
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', REPLICAS, '-inf', '(' .. now)) do
  redis.call('DEL', P .. ':active:' .. dead)
  redis.call('HDEL', HELD, dead)
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
  granted = math.max(math.min(share[me], capacity - others_held), in_flight)
  redis.call('HSET', HELD, me, granted)
end

-- 4. the fleet's view: idle workloads with nothing active are forgotten
for _, id in ipairs(redis.call('ZRANGEBYSCORE', WORKLOADS, '-inf', '(' .. (now - idle))) do
  redis.call('DEL', P .. ':w:' .. id)
  redis.call('ZREM', WORKLOADS, id)
end
local others = {}
for _, r in ipairs(live) do
  if r ~= me then
    local pairs_ = redis.call('HGETALL', P .. ':active:' .. r)
    for i = 1, #pairs_, 2 do
      others[pairs_[i]] = (others[pairs_[i]] or 0) + tonumber(pairs_[i + 1])
    end
  end
end
local out = {granted, #live}
for _, id in ipairs(redis.call('ZRANGE', WORKLOADS, 0, -1)) do
  local key = P .. ':w:' .. id
  local f = redis.call('HMGET', key, 'st', 'bs', 'cur', 'prev', 'ema', 'total', 'dispatched')
  local r = rate(counters(f))
  out[#out + 1] = id
  out[#out + 1] = tonumber(f[6]) or 0
  out[#out + 1] = tonumber(f[7]) or 0
  out[#out + 1] = f[5] or '0'
  out[#out + 1] = string.format('%.9g', r)
  out[#out + 1] = others[id] or 0
end
return out
