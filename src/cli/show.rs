//! How the tool shows things: progress bars on standard error, sizes,
//! durations and records.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sled_idempotency::{MessageId, Record, State};

/// A progress bar on standard error (drawn only on a terminal).
pub(crate) struct Bar(ProgressBar);

/// Sets a bar's position to where it stood when this was made, plus the
/// records a walk reports.
pub(crate) struct Walked {
    bar: ProgressBar,
    base: u64,
}

impl Walked {
    pub(crate) fn set(&self, walked: u64) {
        self.bar.set_position(self.base + walked);
    }
}

impl Bar {
    /// A counter of records walked, for walks whose length is unknown.
    pub(crate) fn records(what: &'static str) -> Bar {
        let bar = ProgressBar::new_spinner().with_message(what);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}: {human_pos} records ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Bar(bar)
    }

    /// A bar of `total` bytes.
    pub(crate) fn bytes(what: &'static str, total: u64) -> Bar {
        let bar = ProgressBar::new(total).with_message(what);
        bar.set_style(
            ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Bar(bar)
    }

    /// A handle that walks on from the bar's current position.
    pub(crate) fn base(&self) -> Walked {
        Walked {
            bar: self.0.clone(),
            base: self.0.position(),
        }
    }

    pub(crate) fn add(&self, n: u64) {
        self.0.inc(n);
    }

    pub(crate) fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// `n` bytes, exactly and in MiB.
pub(crate) fn bytes(n: u64) -> String {
    format!("{} ({:.1} MiB)", thousands(n), n as f64 / (1024.0 * 1024.0))
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn timing(took: Duration) -> String {
    format!("{:.2} s", took.as_secs_f64())
}

/// How far `expires_at` is from `now`, in words.
fn expiry(expires_at: u64, now: u64) -> String {
    let words = |ms: u64| {
        let secs = ms / 1000;
        match secs {
            0 => format!("{ms} ms"),
            1..=119 => format!("{secs} s"),
            120..=7199 => format!("{} min", secs / 60),
            7200..=172_799 => format!("{} h", secs / 3600),
            _ => format!("{} days", secs / 86_400),
        }
    };
    if expires_at > now {
        format!("in {}", words(expires_at - now))
    } else {
        format!("expired {} ago", words(now - expires_at))
    }
}

fn state(record: &Record) -> &'static str {
    match record.state {
        State::Pending => "pending",
        State::Done => "done",
    }
}

/// One record, all fields, as JSON.
pub(crate) fn record_json(
    namespace: &str,
    key: &MessageId,
    record: &Record,
    now: u64,
) -> serde_json::Value {
    json!({
        "namespace": namespace,
        "id": key.to_string(),
        "state": state(record),
        "live": record.is_live(now),
        "expires_at": record.expires_at,
        "token": record.token,
        "attempts": record.attempts,
        "ttl_ms": record.ttl_ms,
        "fingerprint": record.fingerprint.as_ref().map(hex::encode),
        "result": record.result.as_ref().map(hex::encode),
    })
}

/// One record, all fields, one per line.
pub(crate) fn record_fields(namespace: &str, key: &MessageId, record: &Record, now: u64) {
    let hex_or_none =
        |bytes: &Option<Vec<u8>>| bytes.as_ref().map_or("none".to_owned(), hex::encode);
    println!("namespace    {namespace}");
    println!("id           {key}");
    println!(
        "state        {}{}",
        state(record),
        if record.is_live(now) {
            ""
        } else {
            " (expired)"
        }
    );
    println!(
        "expires_at   {} ({})",
        record.expires_at,
        expiry(record.expires_at, now)
    );
    println!("token        {}", record.token);
    println!("attempts     {}", record.attempts);
    println!("ttl_ms       {}", record.ttl_ms);
    println!("fingerprint  {}", hex_or_none(&record.fingerprint));
    println!("result       {}", hex_or_none(&record.result));
}

/// One record as a row of `list`.
pub(crate) fn record_line(key: &MessageId, record: &Record, now: u64) -> String {
    format!(
        "{:<36}  {:<7}  {:>8}  {:>20}  {}",
        key.to_string(),
        state(record),
        record.attempts,
        record.token,
        expiry(record.expires_at, now)
    )
}
