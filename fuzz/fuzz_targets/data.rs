//! Fuzzes the DATA decoder, in both of its modes. Whatever the input and however
//! it is split into reads, the decoder gives the same result, and the end of data
//! is found exactly at the input's first CRLF.CRLF (or ".CRLF" at the very start),
//! never elsewhere.
//!
//! Keeping line ends (`reject`, `accept`): the output is never longer than the
//! input, and the body check flags exactly the bodies holding a bare CR or LF.
//!
//! Normalizing (the default, `normalize`), the smuggling oracle: the stored message
//! has no line end but CRLF, whatever the input; and nothing but line ends and
//! leading dots changed (the other octets are the input's, in order).
#![no_main]

use clustermail::smtp::data::{check_body, DataDecoder, Feed};
use libfuzzer_sys::fuzz_target;

fn decode(make: fn(u64) -> DataDecoder, input: &[u8], split: usize) -> (Vec<u8>, Option<usize>) {
    let mut d = make(1 << 20);
    let mut out = Vec::new();
    let split = split.min(input.len());
    if let Feed::Done(n) = d.feed(&input[..split], &mut out) {
        return (out, Some(n));
    }
    match d.feed(&input[split..], &mut out) {
        Feed::Done(n) => (out, Some(split + n)),
        Feed::More => (out, None),
    }
}

/// An independent definition: a LF not after CR, or a CR not before LF.
fn has_bare_line_end(b: &[u8]) -> bool {
    (0..b.len()).any(|i| {
        (b[i] == b'\n' && (i == 0 || b[i - 1] != b'\r'))
            || (b[i] == b'\r' && b.get(i + 1) != Some(&b'\n'))
    })
}

/// Where the data must end: just after the first CRLF.CRLF, or ".CRLF" first.
fn expected_end(input: &[u8]) -> Option<usize> {
    if input.starts_with(b".\r\n") {
        return Some(3);
    }
    input
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|p| p + 5)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize;
    let input = &data[1..];
    for (make, normalizing) in [
        (DataDecoder::new as fn(u64) -> DataDecoder, false),
        (DataDecoder::normalizing, true),
    ] {
        let (whole, end) = decode(make, input, input.len());
        let (parts, end2) = decode(make, input, split);
        assert_eq!(whole, parts, "split reads change the result");
        assert_eq!(end, end2);
        assert_eq!(end, expected_end(input), "the data ended elsewhere");
        let bare = has_bare_line_end(&whole);
        assert_eq!(check_body(&whole).bare_line_ending, bare);
        if !normalizing {
            assert!(whole.len() <= input.len());
            continue;
        }
        assert!(!bare, "a bare line end was stored: {whole:?}");
        let consumed = &input[..end.unwrap_or(input.len())];
        let text = |b: &[u8]| -> Vec<u8> {
            b.iter()
                .copied()
                .filter(|c| !matches!(c, b'\r' | b'\n' | b'.'))
                .collect()
        };
        assert_eq!(text(consumed), text(&whole), "content changed");
    }
});
