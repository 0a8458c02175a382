-- Each request from one of 20 workloads, chosen at random (`make bench`).
-- WRK_DELAY_MS paces each connection for the fixed-rate latency runs.
-- WRK_BODY, when set, is POSTed as JSON (the pool-mode setups).
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "0")
local body = os.getenv("WRK_BODY") or ""

request = function()
  local headers = { ["x-gateway-inference-fairness-id"] = "w" .. math.random(20) }
  if body ~= "" then
    headers["content-type"] = "application/json"
    return wrk.format("POST", "/v1/completions", headers, body)
  end
  return wrk.format("GET", "/", headers)
end

if delay_ms > 0 then
  delay = function()
    return delay_ms
  end
end
