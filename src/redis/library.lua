#!lua name=sled_idempotency_1

-- The Redis engine's operations, one Redis Function each: every call reads
-- the record, decides exactly as src/machine.rs does, and writes, in one
-- atomic step on the server. tests/redis_differential.rs compares them with
-- the pure model after every step of random operation sequences.
--
-- A record is a hash:
--   s  'p' (pending) or 'd' (done)
--   e  expires_at, unix ms
--   t  fencing token (0: done without a claim)
--   a  attempts
--   l  ttl_ms the key was claimed with
--   f  payload fingerprint (absent when the claim had none)
--   r  cached result (absent when none)
-- It carries a server-side expiry (PEXPIREAT) at the moment it is
-- forgotten, by the deciding clock: a done record at its expiry, a pending
-- one pending_ms after it.
--
-- KEYS[1] is the record, KEYS[2] the token counter of its hash slot bucket.
-- ARGV[1] is the time that decides (unix ms; '' for the server's clock),
-- ARGV[2] pending_ms, ARGV[3] done_ms ('' for none); then per operation.

local function int(n)
  return string.format('%d', n)
end

-- The deciding time: the caller's wall clock, or the server's.
local function clock(arg)
  if arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function load(key)
  local h = redis.call('HGETALL', key)
  if #h == 0 then
    return nil
  end
  local m = {}
  for i = 1, #h, 2 do
    m[h[i]] = h[i + 1]
  end
  return {
    s = m.s, e = tonumber(m.e), t = tonumber(m.t), a = tonumber(m.a),
    l = tonumber(m.l), f = m.f, r = m.r,
  }
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

local function put(key, rec, pend)
  local forget = rec.e
  if rec.s == 'p' then
    forget = rec.e + pend
  end
  local fields = {
    's', rec.s, 'e', int(rec.e), 't', int(rec.t), 'a', int(rec.a), 'l', int(rec.l),
  }
  if rec.f then
    table.insert(fields, 'f')
    table.insert(fields, rec.f)
  end
  if rec.r then
    table.insert(fields, 'r')
    table.insert(fields, rec.r)
  end
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(fields))
  redis.call('PEXPIREAT', key, int(forget))
end

-- A fencing token: above the bucket's last one and never below the
-- server's clock in microseconds, so that a counter lost with the writes
-- of a crash or failover does not hand out an old token again.
local function next_token(counter)
  local t = redis.call('TIME')
  local micros = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('GET', counter) or '0') or 0
  local token = math.max(last + 1, micros)
  redis.call('SET', counter, int(token))
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
  local now = clock(args[1])
  local pend = tonumber(args[2])
  local ttl = tonumber(args[4])
  local fp = nil
  if args[5] == '1' then
    fp = args[6]
  end
  local rec = remembered(load(keys[1]), now, pend)
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
  local token = next_token(keys[2])
  local new = { s = 'p', e = now + ttl, t = token, a = attempts, l = ttl, f = fp }
  put(keys[1], new, pend)
  return {'claimed', token, new.e, attempts}
end)

-- ARGV[4] the default ttl (retention of a done record without a claim).
redis.register_function('sid1_done', function(keys, args)
  local now = clock(args[1])
  local pend = tonumber(args[2])
  local done_ms = tonumber(args[3])
  local rec = remembered(load(keys[1]), now, pend)
  if rec and rec.s == 'p' then
    put(keys[1], done_record(rec, now, done_ms, nil), pend)
    return {'completed'}
  end
  if rec then
    return {'already'}
  end
  local unclaimed = { t = 0, a = 0, l = tonumber(args[4]) }
  put(keys[1], done_record(unclaimed, now, done_ms, nil), pend)
  return {'late'}
end)

redis.register_function('sid1_release', function(keys, args)
  local now = clock(args[1])
  local rec = remembered(load(keys[1]), now, tonumber(args[2]))
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
  local raw = load(keys[1])
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
  put(keys[1], done_record(rec, now, done_ms, result), pend)
  return {'completed'}
end)

-- ARGV[4] token.
redis.register_function('sid1_abandon', function(keys, args)
  local now = clock(args[1])
  local pend = tonumber(args[2])
  local raw = load(keys[1])
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
  local raw = load(keys[1])
  local rec = held(raw, tonumber(args[4]), now, pend)
  if rec == nil then
    return lost(raw, now, pend)
  end
  rec.e = now + tonumber(args[5])
  put(keys[1], rec, pend)
  return {'extended', rec.e}
end)
