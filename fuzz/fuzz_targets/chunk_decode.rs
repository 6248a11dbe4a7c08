//! Arbitrary bytes through the history chunk decoder (`trackgate::store::chunk`), as a
//! damaged or hostile `tg:{P}:hist` member would reach it: no panic, no unbounded
//! allocation, and whatever decodes encodes back to a chunk that decodes to the same rows.
//! The same bytes also go through the reader of what Redis holds (`hist::open`: a clear
//! version-1 chunk, or a sealed version-2 one opened with a data key), which must give
//! rows or a typed error.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use trackgate::pseudonym::{KeyRing, Pseudonym};
use trackgate::store::{chunk, hist};

static RING: LazyLock<KeyRing> = LazyLock::new(KeyRing::ephemeral);
static DEVICE: LazyLock<Pseudonym> =
    LazyLock::new(|| Pseudonym::parse("p1_aaaaaaaaaaaaaaaaaaaaaaaaaa").expect("valid"));

fuzz_target!(|data: &[u8]| {
    let _ = hist::open(RING.vault(), &DEVICE, data);
    let header = chunk::header(data);
    let Ok(rows) = chunk::decode(data) else {
        return;
    };
    let h = header.expect("a chunk that decodes has a header");
    assert_eq!(h.count, rows.len());
    let again = chunk::encode(&rows);
    assert_eq!(chunk::decode(&again).as_ref(), Ok(&rows), "re-encoding changed the rows");
});
