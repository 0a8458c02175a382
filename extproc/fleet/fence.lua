-- Settle a sync whose reply was lost (see sync.py): raise the replica's fence
-- to that sync's number, so the call can no longer be applied if it is still
-- on its way, and return the number of the last call applied. A call numbered
-- at or below the answer was applied; above it, it never will be, and its
-- deltas can be sent again under a new number.
-- ARGV: prefix, replica, seq
local P, me, seq = ARGV[1], ARGV[2], tonumber(ARGV[3])
if seq > tonumber(redis.call('HGET', P .. ':fence', me) or '-1') then
  redis.call('HSET', P .. ':fence', me, seq)
end
return tonumber(redis.call('HGET', P .. ':seq', me) or '-1')
