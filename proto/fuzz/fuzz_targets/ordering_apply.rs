#![no_main]

//! The ordering state machine on arbitrary logs: two replicas that apply the same commands give
//! the same outcomes and end in the same state; nothing panics; bounds hold.

use arbitrary::{Arbitrary, Unstructured};
use chitchat_proto::ordering::{OrderingCommand, OrderingLimits, OrderingState};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(limits) = OrderingLimits::arbitrary(&mut u) else { return };
    let limits = OrderingLimits {
        max_channels: limits.max_channels % 64,
        retained_epochs: limits.retained_epochs % 128,
    };
    let Ok(commands) = Vec::<OrderingCommand>::arbitrary(&mut u) else { return };
    let (mut a, mut b) = (OrderingState::new(limits), OrderingState::new(limits));
    for command in &commands {
        assert_eq!(a.apply(command), b.apply(command));
        assert!(a.channel_count() <= limits.max_channels);
    }
    assert_eq!(a, b);
});
