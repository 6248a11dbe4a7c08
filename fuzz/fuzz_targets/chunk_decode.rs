//! Arbitrary bytes through the history chunk decoder (`trackgate::store::chunk`), as a
//! damaged or hostile `tg:{P}:hist` member would reach it: no panic, no unbounded
//! allocation, and whatever decodes encodes back to a chunk that decodes to the same rows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trackgate::store::chunk;

fuzz_target!(|data: &[u8]| {
    let header = chunk::header(data);
    let Ok(rows) = chunk::decode(data) else {
        return;
    };
    let h = header.expect("a chunk that decodes has a header");
    assert_eq!(h.count, rows.len());
    let again = chunk::encode(&rows);
    assert_eq!(chunk::decode(&again).as_ref(), Ok(&rows), "re-encoding changed the rows");
});
