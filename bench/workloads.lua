-- Each request from one of 20 workloads, chosen at random (`make bench`).
-- WRK_DELAY_MS paces each connection for the fixed-rate latency runs.
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "0")

request = function()
  local headers = { ["x-gateway-inference-fairness-id"] = "w" .. math.random(20) }
  return wrk.format("GET", "/", headers)
end

if delay_ms > 0 then
  delay = function()
    return delay_ms
  end
end
