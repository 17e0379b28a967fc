#![no_main]

use chitchat_proto::codec::Canonical as _;
use chitchat_proto::ordering::{EpochRecord, EpochReport, compare};

// A report from the network: decodes canonically, and checking it or comparing it with a
// record never panics.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chitchat_proto_fuzz::canonical::<EpochReport>(data);
    if let Ok(report) = EpochReport::from_bytes(data) {
        let _ = report.verify();
        let own = EpochRecord { digest: [0; 32], cert: report.body.cert.clone() };
        let _ = compare(&own, &report.body);
    }
});
