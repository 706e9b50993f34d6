#!lua name=sled_idempotency_1

-- The Redis engine's operations, one Redis Function each: every call reads
-- the record, decides exactly as src/machine.rs does, and writes, in one
-- atomic step on the server. tests/redis_differential.rs compares them with
-- the pure model after every step of random operation sequences.
--
-- A record is a string: the MessagePack array
--   [state 'p' (pending) or 'd' (done), expires_at (unix ms), fencing
--    token (0: done without a claim), attempts, ttl_ms, fingerprint or
--    false, cached result or false]
-- written with one SET ... PXAT at the moment it is forgotten, by the
-- deciding clock: a done record at its expiry, a pending one pending_ms
-- after it. (One string and one SET cost fewer server calls than a hash
-- and its expiry: tests and BENCHMARKS.md measure the claim path.)
--
-- KEYS[1] is the record, KEYS[2] the token counter of its hash slot bucket.
-- ARGV[1] is the time that decides (unix ms; '' for the server's clock),
-- ARGV[2] pending_ms, ARGV[3] done_ms ('' for none); then per operation.

local function int(n)
  return string.format('%d', n)
end

-- The server's clock in microseconds.
local function micros()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The deciding time in ms: the caller's wall clock, or the server's
-- (`server_us`, when the caller already read it).
local function clock(arg, server_us)
  if arg ~= '' then
    return tonumber(arg)
  end
  return math.floor((server_us or micros()) / 1000)
end

local function corrupt(key, why)
  return redis.error_reply('CORRUPT the record stored at ' .. key .. ' ' .. why)
end

local function optional(v)
  return v == false or type(v) == 'string'
end

-- The record at `key`, nil if absent, or an error reply if it is not one.
local function load(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' and v.err then
    return nil, corrupt(key, 'is not a string')
  end
  if not v then
    return nil
  end
  local ok, m = pcall(cmsgpack.unpack, v)
  if not ok or type(m) ~= 'table' then
    return nil, corrupt(key, 'is not MessagePack')
  end
  if (m[1] ~= 'p' and m[1] ~= 'd') or type(m[2]) ~= 'number' or type(m[3]) ~= 'number'
      or type(m[4]) ~= 'number' or type(m[5]) ~= 'number' or not optional(m[6])
      or not optional(m[7]) then
    return nil, corrupt(key, 'does not have the fields of a record')
  end
  return { s = m[1], e = m[2], t = m[3], a = m[4], l = m[5], f = m[6] or nil, r = m[7] or nil }
end

-- machine::Retention::remembered: nil for an absent or forgotten record.
local function remembered(rec, now, pend)
  if rec == nil then
    return nil
  end
  if rec.s == 'd' then
    if now < rec.e then return rec end
    return nil
  end
  if now < rec.e + pend then return rec end
  return nil
end

-- Writes `rec`, to expire on the server when it is forgotten. With a
-- caller's clock (`args[1]` set) the server keeps it at least as long as
-- that clock still remembers it, counted on the server's own clock from
-- now, so a caller's clock behind the server's never loses a record early;
-- one ahead only keeps forgotten records longer, which no answer sees.
local function put(key, rec, pend, now, args, server_us)
  local forget = rec.e
  if rec.s == 'p' then
    forget = rec.e + pend
  end
  if args[1] ~= '' then
    local server_ms = math.floor((server_us or micros()) / 1000)
    forget = math.max(forget, server_ms + (forget - now))
  end
  local packed = cmsgpack.pack({ rec.s, rec.e, rec.t, rec.a, rec.l, rec.f or false, rec.r or false })
  redis.call('SET', key, packed, 'PXAT', int(forget))
end

-- A fencing token: above the bucket's last one and never below the
-- server's clock in microseconds, so that a counter lost with the writes
-- of a crash or failover does not hand out an old token again.
local function next_token(counter, now_us)
  local token = now_us
  local last = tonumber(redis.call('SET', counter, int(token), 'GET') or '0') or 0
  if last >= token then
    token = last + 1
    redis.call('SET', counter, int(token))
  end
  return token
end

-- machine::Holder::of, as a reply.
local function lost(raw, now, pend)
  local rec = remembered(raw, now, pend)
  if rec == nil then
    return {'lost', 'nothing'}
  end
  if rec.s == 'p' then
    return {'lost', 'claim', rec.t, rec.e, rec.a}
  end
  return {'lost', 'done', rec.t, rec.e}
end

-- The remembered pending record of lease `token`, or nil.
local function held(raw, token, now, pend)
  local rec = remembered(raw, now, pend)
  if rec and rec.s == 'p' and rec.t == token then
    return rec
  end
  return nil
end

local function done_record(rec, now, done_ms, result)
  local keep = rec.l
  if done_ms then
    keep = done_ms
  end
  return { s = 'd', e = now + keep, t = rec.t, a = rec.a, l = rec.l, f = rec.f, r = result }
end

-- ARGV[4] ttl_ms, ARGV[5] '1' with a fingerprint in ARGV[6].
redis.register_function('sid1_claim', function(keys, args)
  local now_us = micros()
  local now = clock(args[1], now_us)
  local pend = tonumber(args[2])
  local ttl = tonumber(args[4])
  local fp = nil
  if args[5] == '1' then
    fp = args[6]
  end
  local raw, err = load(keys[1])
  if err then return err end
  local rec = remembered(raw, now, pend)
  local attempts = 1
  if rec then
    if now < rec.e then
      if fp and rec.f and fp ~= rec.f then
        return {'conflict', rec.s}
      end
      if rec.s == 'p' then
        return {'pending', rec.e, rec.a}
      end
      if rec.r then
        return {'done', rec.r}
      end
      return {'done'}
    end
    -- A remembered expired claim: a handler that never finished.
    attempts = math.min(rec.a + 1, 4294967295)
  end
  local token = next_token(keys[2], now_us)
  local new = { s = 'p', e = now + ttl, t = token, a = attempts, l = ttl, f = fp }
  put(keys[1], new, pend, now, args, now_us)
  return {'claimed', token, new.e, attempts}
end)

-- ARGV[4] the default ttl (retention of a done record without a claim).
redis.register_function('sid1_done', function(keys, args)
  local now = clock(args[1])
  local pend = tonumber(args[2])
  local done_ms = tonumber(args[3])
  local raw, err = load(keys[1])
  if err then return err end
  local rec = remembered(raw, now, pend)
  if rec and rec.s == 'p' then
    put(keys[1], done_record(rec, now, done_ms, nil), pend, now, args)
    return {'completed'}
  end
  if rec then
    return {'already'}
  end
  local unclaimed = { t = 0, a = 0, l = tonumber(args[4]) }
  put(keys[1], done_record(unclaimed, now, done_ms, nil), pend, now, args)
  return {'late'}
end)

redis.register_function('sid1_release', function(keys, args)
  local now = clock(args[1])
  local raw, err = load(keys[1])
  if err then return err end
  local rec = remembered(raw, now, tonumber(args[2]))
  if rec and rec.s == 'p' then
    redis.call('DEL', keys[1])
    return {'removed'}
  end
  return {'kept'}
end)

-- ARGV[4] token, ARGV[5] '1' with a result in ARGV[6].
redis.register_function('sid1_complete', function(keys, args)
  local now = clock(args[1])
  local pend = tonumber(args[2])
  local done_ms = tonumber(args[3])
  local token = tonumber(args[4])
  local result = nil
  if args[5] == '1' then
    result = args[6]
  end
  local raw, err = load(keys[1])
  if err then return err end
  if raw and raw.s == 'd' and raw.t == token and now < raw.e then
    if result and raw.r ~= result then
      return {'different'}
    end
    return {'already'}
  end
  local rec = held(raw, token, now, pend)
  if rec == nil then
    return lost(raw, now, pend)
  end
  put(keys[1], done_record(rec, now, done_ms, result), pend, now, args)
  return {'completed'}
end)

-- ARGV[4] token.
redis.register_function('sid1_abandon', function(keys, args)
  local now = clock(args[1])
  local pend = tonumber(args[2])
  local raw, err = load(keys[1])
  if err then return err end
  if held(raw, tonumber(args[4]), now, pend) == nil then
    return lost(raw, now, pend)
  end
  redis.call('DEL', keys[1])
  return {'abandoned'}
end)

-- ARGV[4] token, ARGV[5] ttl_ms.
redis.register_function('sid1_extend', function(keys, args)
  local now = clock(args[1])
  local pend = tonumber(args[2])
  local raw, err = load(keys[1])
  if err then return err end
  local rec = held(raw, tonumber(args[4]), now, pend)
  if rec == nil then
    return lost(raw, now, pend)
  end
  rec.e = now + tonumber(args[5])
  put(keys[1], rec, pend, now, args)
  return {'extended', rec.e}
end)

-- The server's clock (ms) and the stored record, forgotten or not:
-- [now] when absent, [now, state, expires_at, token, attempts, ttl_ms,
-- fingerprint or false, result or false] otherwise.
redis.register_function {
  function_name = 'sid1_get',
  flags = { 'no-writes' },
  callback = function(keys)
    local now = math.floor(micros() / 1000)
    local rec, err = load(keys[1])
    if err then return err end
    if rec == nil then return { now } end
    return { now, rec.s, rec.e, rec.t, rec.a, rec.l, rec.f or false, rec.r or false }
  end,
}
