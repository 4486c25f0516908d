-- Realistic MCN Telecom webhook traffic for wrk (Debian's wrk 4.1, LuaJIT).
--
-- Parameters come from the environment, because wrk decides whether delay() and response()
-- exist when it loads this file, before init() sees any arguments:
--   MCN_BENCH_MODE        "calls": interleaved lifecycles of many concurrent calls (default);
--                         "starts": only start events, each opening a new leg (memory section)
--   MCN_BENCH_RUN         a prefix that makes this run's call ids unique
--   MCN_BENCH_ACCOUNT     account_id;  MCN_BENCH_SECRET: its secret
--   MCN_BENCH_EXTENSIONS  how many extensions the calls ring (default 60)
--   MCN_BENCH_DELAY_MS    pause per connection between a response and its next request; with
--                         C connections the rate is about C * 1000 / delay events per second
--   MCN_BENCH_PAUSES      "drawn" (default): each pause drawn from an exponential distribution
--                         of that mean, as webhooks of independent calls arrive; "fixed": always
--                         that pause (the connections then fall into step with a group commit)
--   MCN_BENCH_LIMIT       "starts" mode: each wrk thread stops after this many responses
--
-- done() prints one line "BENCH_JSON {...}" with the counts and latency percentiles (in us).

local mode = os.getenv("MCN_BENCH_MODE") or "calls"
local run = os.getenv("MCN_BENCH_RUN") or "run"
local account = tonumber(os.getenv("MCN_BENCH_ACCOUNT") or "10123")
local secret = os.getenv("MCN_BENCH_SECRET") or "SecretToken"
local extensions = tonumber(os.getenv("MCN_BENCH_EXTENSIONS") or "60")
local delay_ms = tonumber(os.getenv("MCN_BENCH_DELAY_MS") or "0")
local drawn_pauses = (os.getenv("MCN_BENCH_PAUSES") or "drawn") ~= "fixed"
local limit = tonumber(os.getenv("MCN_BENCH_LIMIT") or "0")

local SLOTS = 256 -- calls in progress per wrk thread; their events interleave
local COMPANY = "+421233005500"
local headers = { ["Content-Type"] = "application/json" }

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state).
tid = 0
local calls_made = 0
local slots = {}
local next_slot = 1
responses = 0
bad = 0

local function party(n)
  -- The other party's number: unique per call, so that calls without call_id never mix.
  return string.format("+4219%02d%07d", tid % 100, n % 10000000)
end

local function body(event, abon, did, call_id, billsec)
  local parts = { '{"event_type":"', event, '"' }
  if abon ~= nil then
    -- The provider sends abon as a string or, in some integrations, as a number.
    if abon % 3 == 0 then
      parts[#parts + 1] = ',"abon":' .. abon
    else
      parts[#parts + 1] = ',"abon":"' .. abon .. '"'
    end
  end
  parts[#parts + 1] = ',"did":"' .. did .. '","did_mcn":"' .. COMPANY .. '"'
  if call_id ~= nil then
    parts[#parts + 1] = ',"call_id":"' .. call_id .. '"'
  end
  if billsec ~= nil then
    parts[#parts + 1] = ',"billsec":' .. billsec
  end
  parts[#parts + 1] = ',"secret":"' .. secret .. '","account_id":' .. account .. "}"
  return table.concat(parts)
end

-- One call: the list of bodies it sends, in order. The mix, per 20 calls:
-- 9 inbound answered, 3 inbound missed, 2 ring groups (two extensions ring, one answers),
-- 4 outbound answered, 1 outbound not answered, 1 telephony (company number, no extension).
-- Every fourth call carries no call_id, as in the provider's documented examples.
local function new_call()
  calls_made = calls_made + 1
  local n = calls_made
  local kind = n % 20
  local did = party(n)
  local id = nil
  if n % 4 ~= 1 or (kind >= 12 and kind < 14) then
    id = string.format("%s-%d-%d", run, tid, n)
  end
  local a = 100 + (n * 7 + tid) % extensions
  local b = 100 + (n * 7 + tid + 1) % extensions
  local talk = 5 + (n * 37) % 600
  if kind < 9 then
    return {
      body("onInCallingStart", a, did, id),
      body("onInCallingAnswered", a, did, id),
      body("onInCallingEnd", a, did, id, talk),
    }
  elseif kind < 12 then
    return { body("onInCallingStart", a, did, id), body("onInCallingMissed", a, did, id) }
  elseif kind < 14 then
    return {
      body("onInCallingStart", a, did, id),
      body("onInCallingStart", b, did, id),
      body("onInCallingAnswered", a, did, id),
      body("onCloseIncomingNotice", b, did, id),
      body("onInCallingEnd", a, did, id, talk),
    }
  elseif kind < 18 then
    return {
      body("onOutCallingStart", a, did, id),
      body("onOutCallingAnswered", a, did, id),
      body("onOutCallingEnd", a, did, id, talk),
    }
  elseif kind < 19 then
    return { body("onOutCallingStart", a, did, id), body("onOutCallingMissed", a, did, id) }
  end
  return { body("InboundCallStart", nil, did, id), body("InboundCallEnd", nil, did, id) }
end

local function next_body()
  if mode == "starts" then
    calls_made = calls_made + 1
    local n = calls_made
    local id = string.format("%s-%d-%d", run, tid, n)
    return body("onInCallingStart", 100 + n % extensions, party(n), id)
  end
  local slot = slots[next_slot]
  if slot == nil or slot.pos > #slot.events then
    slot = { events = new_call(), pos = 1 }
    slots[next_slot] = slot
  end
  next_slot = next_slot % SLOTS + 1
  local text = slot.events[slot.pos]
  slot.pos = slot.pos + 1
  return text
end

function request()
  return wrk.format("POST", nil, headers, next_body())
end

if delay_ms > 0 and drawn_pauses then
  local seeded = false
  function delay()
    if not seeded then -- each thread its own draws (tid is set once the thread runs)
      math.randomseed(tid * 7919 + os.time())
      seeded = true
    end
    return -delay_ms * math.log(1 - math.random())
  end
elseif delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

if mode == "starts" then
  function response(status, headers, body)
    responses = responses + 1
    if status ~= 200 then
      bad = bad + 1
    end
    if limit > 0 and responses >= limit then
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"max_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout
  ))
end
