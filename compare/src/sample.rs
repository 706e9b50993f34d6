//! What a run measured, and the runtime every measurement runs on: the
//! names both the engines and the measurements use.

use std::time::Duration;

/// Latencies (ns) of the operations of one run and how long it lasted.
pub struct Sample {
    pub latencies: Vec<u64>,
    pub elapsed: Duration,
}

impl Sample {
    pub fn merge(parts: Vec<Vec<u64>>, elapsed: Duration) -> Sample {
        let mut latencies: Vec<u64> = parts.into_iter().flatten().collect();
        latencies.sort_unstable();
        Sample { latencies, elapsed }
    }

    pub fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        Duration::from_nanos(self.latencies[i])
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
