-- A replica leaves the fleet (see sync.py): its slots free at once, and its
-- active requests leave the fleet's totals (the workloads are marked changed,
-- so the other replicas hear of it at their next sync).
-- A replica that ever lost a sync's reply may have a copy of that call still on
-- its way: its fence is raised to its last sync number and kept, so the copy is
-- refused when it lands instead of bringing the departed replica back for a
-- lease. The others' fences go (no call of theirs can be on its way), so the
-- fences kept grow only with replicas that left with a reply lost.
-- ARGV: prefix, replica, fence (its last sync number; 0: none to keep)
local P, me, keep = ARGV[1], ARGV[2], tonumber(ARGV[3])
local mine_key = P .. ':active:' .. me
local held = redis.call('HGETALL', mine_key)
if #held > 0 then
  local version = redis.call('INCR', P .. ':version')
  for i = 1, #held, 2 do
    local id = held[i]
    if redis.call('HINCRBY', P .. ':active-total', id, -tonumber(held[i + 1])) <= 0 then
      redis.call('HDEL', P .. ':active-total', id)
    end
    redis.call('ZADD', P .. ':changed', version, id)
  end
end
redis.call('DEL', mine_key)
redis.call('ZREM', P .. ':replicas', me)
for _, h in ipairs({'held', 'grant', 'demand', 'seq'}) do
  redis.call('HDEL', P .. ':' .. h, me)
end
if keep > 0 then
  if keep > tonumber(redis.call('HGET', P .. ':fence', me) or '-1') then
    redis.call('HSET', P .. ':fence', me, keep)
  end
else
  redis.call('HDEL', P .. ':fence', me)
end
return 0
