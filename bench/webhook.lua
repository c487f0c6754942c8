-- wrk script: POST pre-signed, distinct webhook bodies to /api/webhook.
--
-- WEBHOOK_BODIES names a file of lines "<X-Hub-Signature-256 value>\t<body>". Each wrk
-- thread sends its own share of the lines (line i goes to thread i % threads), in order,
-- so no body is sent twice unless a thread runs out (it then starts over and counts a wrap).

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local path = os.getenv("WEBHOOK_BODIES")
  local nthreads = tonumber(os.getenv("WEBHOOK_THREADS") or "1")
  requests_ = {}
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == id then
      local tab = line:find("\t", 1, true)
      local sig = line:sub(1, tab - 1)
      local body = line:sub(tab + 1)
      requests_[#requests_ + 1] = wrk.format("POST", "/api/webhook", {
        ["Content-Type"] = "application/json",
        ["X-Hub-Signature-256"] = sig,
      }, body)
    end
    i = i + 1
  end
  position = 0
  wrapped = 0
end

function request()
  position = position + 1
  if position > #requests_ then
    position = 1
    wrapped = wrapped + 1
  end
  return requests_[position]
end

function done(summary, latency, requests)
  local wraps = 0
  for _, thread in ipairs(threads) do
    wraps = wraps + (thread:get("wrapped") or 0)
  end
  io.write(string.format("WRAPPED %d\n", wraps))
end
