-- wrk script of scripts/bench-orders: the simplest DynamoDB PutItem (one
-- string key) into $TABLE, a new key per request; DynamoDB Local accepts
-- any signature. At the end, one JSON line with what was measured.
local table_name = os.getenv("TABLE") or "flashsale-orders"
local counter = 0

function setup(thread)
  thread:set("id", math.random(1, 1000000))
end

function request()
  counter = counter + 1
  local body = string.format('{"TableName":"%s","Item":{"order_id":{"S":"ceiling-%d-%d"}}}',
    table_name, id, counter)
  return wrk.format("POST", "/", {
    ["Content-Type"] = "application/x-amz-json-1.0",
    ["X-Amz-Target"] = "DynamoDB_20120810.PutItem",
    ["Authorization"] = "AWS4-HMAC-SHA256 Credential=local/20200101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=x",
  }, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"seconds":%.3f,"rps":%.1f,"p50_ms":%.3f,"p99_ms":%.3f,"non_2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, e.status,
    e.connect + e.read + e.write + e.timeout))
end
