//! Fuzzes the DATA decoder: whatever the input and however it is split into reads,
//! the decoder gives the same result; the end is found only at CRLF.CRLF; the
//! output is never longer than the input; and the body check flags exactly the
//! bodies holding a bare CR or LF.
#![no_main]

use clustermail::smtp::data::{check_body, DataDecoder, Feed};
use libfuzzer_sys::fuzz_target;

fn decode(input: &[u8], split: usize) -> (Vec<u8>, Option<usize>) {
    let mut d = DataDecoder::new(1 << 20);
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

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize;
    let input = &data[1..];
    let (whole, end) = decode(input, input.len());
    let (parts, end2) = decode(input, split);
    assert_eq!(whole, parts, "split reads change the result");
    assert_eq!(end, end2);
    assert!(whole.len() <= input.len());
    if let Some(n) = end {
        // The end of data is CRLF.CRLF, or ".CRLF" at the very start.
        let consumed = &input[..n];
        assert!(
            consumed.ends_with(b"\r\n.\r\n") || consumed == b".\r\n",
            "{consumed:?}"
        );
    }
    // An independent definition: a LF not after CR, or a CR not before LF.
    let bare = (0..whole.len()).any(|i| {
        (whole[i] == b'\n' && (i == 0 || whole[i - 1] != b'\r'))
            || (whole[i] == b'\r' && whole.get(i + 1) != Some(&b'\n'))
    });
    assert_eq!(check_body(&whole).bare_line_ending, bare);
});
