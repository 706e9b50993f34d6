//! Arbitrary bytes fed to the record decoder must give a record or an
//! error, never a panic; a decoded record must survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sled_idempotency::Record;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Record::decode(data) {
        let again = Record::decode(&record.encode());
        assert_eq!(again.as_ref(), Ok(&record), "round trip of {data:?}");
    }
});
