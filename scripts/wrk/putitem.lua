-- wrk script of scripts/bench-orders: the simplest DynamoDB PutItem (one
-- string key) into $TABLE, a new key per request; DynamoDB Local accepts
-- any signature. The report: report.lua.
local table_name = os.getenv("TABLE") or "flashsale-orders"
local counter = 0

dofile("scripts/wrk/report.lua")

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
