-- A replica leaves the fleet (see sync.py): its slots free at once, and its
-- active requests leave the fleet's totals (the workloads are marked changed,
-- so the other replicas hear of it at their next sync).
-- ARGV: prefix, replica
local P, me = ARGV[1], ARGV[2]
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
for _, h in ipairs({'held', 'grant', 'demand', 'seq', 'fence'}) do
  redis.call('HDEL', P .. ':' .. h, me)
end
return 0
