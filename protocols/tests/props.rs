//! Property tests: hostile bytes never panic, valid frames survive garbage around them,
//! and everything the encoders write decodes back to what was encoded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use jiff::Timestamp;
use proptest::prelude::*;
use trackgate_protocols::encode::{self, Command, OutputAction};
use trackgate_protocols::{
    Analog, Cell, Direction, Fix, Frame, Framer, MessageKind, Reply, Scan, decode, expected_reply,
};

const IMEI: &str = "350000000000001"; // fake test IMEI

/// Scan `buf` to the end the way a connection does, decoding every frame found.
/// Returns the raw frames; panics only if the framer breaks its own contract.
fn scan_all(framer: &Framer, mut buf: &[u8]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    loop {
        match framer.scan(buf) {
            Scan::Frame(f) => {
                let _ = decode(&f);
                frames.push(f.raw().to_vec());
                buf = &buf[f.len()..];
            }
            Scan::Reject { skip, .. } => {
                assert!(
                    (1..=buf.len()).contains(&skip),
                    "skip {skip} of {}",
                    buf.len()
                );
                buf = &buf[skip..];
            }
            Scan::Incomplete { .. } => return frames,
        }
    }
}

fn one_frame(bytes: &[u8], direction: Direction) -> Frame<'_> {
    match Framer::new(direction, 4096).scan(bytes) {
        Scan::Frame(f) if f.len() == bytes.len() => f,
        other => panic!("encoder output is not one frame: {other:?}"),
    }
}

fn device_frame(command: &[u8; 3], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode::frame(
        Direction::DeviceToServer,
        b'A',
        IMEI,
        command,
        payload,
        &mut out,
    )
    .expect("valid envelope");
    out
}

fn time() -> impl Strategy<Value = Timestamp> {
    // 2000-01-01 ..= 2099-12-31, whole seconds.
    (946_684_800i64..4_102_444_799).prop_map(|s| Timestamp::from_second(s).expect("in range"))
}

prop_compose! {
    fn cell()(mcc in 0u16..1000, mnc in 0u16..1000, lac in 0u32..=0xffff, cell_id in 0u32..=0xffff) -> Cell {
        Cell { mcc, mnc, lac, cell_id }
    }
}

prop_compose! {
    /// A fix with every core field present and in range of every format.
    fn core_fix()(
        event in 0u16..=255,
        time in time(),
        valid in any::<bool>(),
        lat_e6 in -90_000_000i32..=90_000_000,
        lon_e6 in -180_000_000i32..=180_000_000,
        speed_kmh in 0u32..=999,
        course_deg in 0u16..360,
        altitude_m in -500i32..=9000,
        satellites in 0u8..=40,
        hdop_x10 in 0u16..=999,
        gsm_signal in 0u8..=31,
        mileage_m in 0u64..=u64::from(u32::MAX),
        runtime_s in 0u64..=u64::from(u32::MAX),
        cell in cell(),
    ) -> Fix<'static> {
        Fix {
            event: Some(event),
            time: Some(time),
            valid: Some(valid),
            lat_e6: Some(lat_e6),
            lon_e6: Some(lon_e6),
            speed_kmh_x10: Some(speed_kmh * 10),
            course_deg: Some(course_deg),
            altitude_m: Some(altitude_m),
            satellites: Some(satellites),
            hdop_x10: Some(hdop_x10),
            gsm_signal: Some(gsm_signal),
            mileage_m: Some(mileage_m),
            runtime_s: Some(runtime_s),
            cell: Some(cell),
            ..Fix::default()
        }
    }
}

prop_compose! {
    fn aaa_fix()(
        mut fix in core_fix(),
        io in any::<(u8, u8)>(),
        raw in proptest::array::uniform5(0u32..=0xffff),
    ) -> Fix<'static> {
        fix.inputs = Some(io.0);
        fix.outputs = Some(io.1);
        fix.analog = Analog {
            adc_raw: [Some(raw[0]), Some(raw[1]), Some(raw[2])],
            battery_raw: Some(raw[3]),
            power_raw: Some(raw[4]),
            ..Analog::default()
        };
        fix
    }
}

prop_compose! {
    fn cce_fix()(mut fix in core_fix(), event in 0u16..=0xffff, io in any::<(u8, u8)>(), altitude_m in -32768i32..=32767) -> Fix<'static> {
        fix.event = Some(event);
        fix.inputs = Some(io.0);
        fix.outputs = Some(io.1);
        fix.altitude_m = Some(altitude_m);
        fix
    }
}

/// The fields both sides of a CCC round trip carry.
fn ccc_core(f: &Fix<'_>) -> impl PartialEq + std::fmt::Debug {
    (
        (
            f.event,
            f.time,
            f.valid,
            f.lat_e6,
            f.lon_e6,
            f.speed_kmh_x10,
        ),
        (
            f.course_deg,
            f.altitude_m,
            f.satellites,
            f.hdop_x10,
            f.gsm_signal,
        ),
        (f.mileage_m, f.runtime_s, f.cell),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        scan_all(&Framer::default(), &bytes);
        scan_all(&Framer::new(Direction::ServerToDevice, 512), &bytes);
    }

    /// Payloads that pass the envelope checks reach the decoders: hostile content there
    /// must give a typed error, never a panic.
    #[test]
    fn arbitrary_payloads_never_panic(
        cmd in prop::sample::select(vec![*b"AAA", *b"AFF", *b"CCE", *b"CCC", *b"AAC", *b"D00", *b"D03", *b"D82", *b"A10", *b"XYZ"]),
        payload in proptest::collection::vec(any::<u8>(), 0..1500),
    ) {
        let raw = device_frame(&cmd, &payload);
        let _ = decode(&one_frame(&raw, Direction::DeviceToServer));
    }

    /// The same, for payloads close to real ones: a valid AAA with fields mutated.
    #[test]
    fn mutated_aaa_never_panics(fix in aaa_fix(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut payload = Vec::new();
        encode::aaa_payload(&fix, &mut payload).expect("encodable");
        let i = at.index(payload.len());
        payload[i] = byte;
        let raw = device_frame(b"AAA", &payload);
        let _ = decode(&one_frame(&raw, Direction::DeviceToServer));
    }

    #[test]
    fn mutated_cce_never_panics(fixes in proptest::collection::vec(cce_fix(), 1..4), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut payload = Vec::new();
        encode::cce_payload(&fixes, 0, &mut payload).expect("encodable");
        let i = at.index(payload.len());
        payload[i] = byte;
        let raw = device_frame(b"CCE", &payload);
        let _ = decode(&one_frame(&raw, Direction::DeviceToServer));
    }

    /// Garbage without a `$$` marker in it never hides a valid frame placed after it.
    #[test]
    fn frames_survive_garbage_around_them(
        fix in aaa_fix(),
        before in proptest::collection::vec(any::<u8>(), 0..300),
        after in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        prop_assume!(!before.windows(2).any(|w| w == b"$$"));
        let mut payload = Vec::new();
        encode::aaa_payload(&fix, &mut payload).expect("encodable");
        let frame = device_frame(b"AAA", &payload);
        let mut stream = before.clone();
        stream.extend_from_slice(&frame);
        stream.extend_from_slice(&after);
        let found = scan_all(&Framer::default(), &stream);
        prop_assert_eq!(found.first(), Some(&frame));
    }

    #[test]
    fn aaa_round_trip(fix in aaa_fix(), flag in 0x21u8..=0x7e) {
        prop_assume!(flag != b',' && flag != b'*');
        let mut payload = Vec::new();
        encode::aaa_payload(&fix, &mut payload).expect("encodable");
        let mut raw = Vec::new();
        encode::frame(Direction::DeviceToServer, flag, IMEI, b"AAA", &payload, &mut raw).expect("frame");
        let frame = one_frame(&raw, Direction::DeviceToServer);
        prop_assert_eq!(frame.flag(), flag);
        prop_assert_eq!(frame.imei(), IMEI);
        let msg = decode(&frame).expect("decodes");
        prop_assert_eq!(msg.kind, MessageKind::Aaa);
        prop_assert_eq!(msg.fixes.len(), 1);
        prop_assert_eq!(&msg.fixes[0], &fix);
        prop_assert_eq!(expected_reply(&msg, true), None);
    }

    #[test]
    fn cce_round_trip(fixes in proptest::collection::vec(cce_fix(), 1..8), cached in any::<u32>()) {
        let mut payload = Vec::new();
        encode::cce_payload(&fixes, cached, &mut payload).expect("encodable");
        let raw = device_frame(b"CCE", &payload);
        let msg = decode(&one_frame(&raw, Direction::DeviceToServer)).expect("decodes");
        prop_assert_eq!(msg.kind, MessageKind::Cce);
        prop_assert_eq!(msg.cached_records, Some(cached));
        prop_assert_eq!(&msg.fixes, &fixes);
        prop_assert_eq!(expected_reply(&msg, true), Some(Reply::Cce { records: fixes.len() as u32 }));
        prop_assert_eq!(expected_reply(&msg, false), None);
    }

    #[test]
    fn ccc_round_trip(mut fixes in proptest::collection::vec(core_fix(), 1..8), cached in any::<u32>()) {
        // CCC carries altitude as u16 (protocol notes §4): no negative altitudes.
        for f in &mut fixes {
            f.altitude_m = f.altitude_m.map(|a| a.abs());
        }
        let mut payload = Vec::new();
        encode::ccc_payload(&fixes, cached, &mut payload).expect("encodable");
        let raw = device_frame(b"CCC", &payload);
        let msg = decode(&one_frame(&raw, Direction::DeviceToServer)).expect("decodes");
        prop_assert_eq!(msg.kind, MessageKind::Ccc);
        prop_assert_eq!(msg.cached_records, Some(cached));
        prop_assert_eq!(msg.fixes.len(), fixes.len());
        for (got, sent) in msg.fixes.iter().zip(&fixes) {
            prop_assert_eq!(ccc_core(got), ccc_core(sent));
        }
        prop_assert_eq!(expected_reply(&msg, false), Some(Reply::Ccc { records: fixes.len() as u32 }));
    }

    #[test]
    fn replies_round_trip(records in any::<u32>(), flag in prop::sample::select(b"AZaz09_^[".to_vec())) {
        for reply in [Reply::Ccc { records }, Reply::Cce { records }, Reply::Aac] {
            let mut raw = Vec::new();
            reply.encode(flag, IMEI, &mut raw).expect("encodable");
            let frame = one_frame(&raw, Direction::ServerToDevice);
            prop_assert_eq!(frame.flag(), flag);
            prop_assert_eq!(frame.imei(), IMEI);
            let (cmd, param) = match reply {
                Reply::Ccc { records } => (*b"CCC", records.to_string()),
                Reply::Cce { records } => (*b"CCE", records.to_string()),
                Reply::Aac => (*b"AAC", "1".to_owned()),
            };
            prop_assert_eq!(frame.command(), cmd);
            prop_assert_eq!(frame.payload(), param.as_bytes());
        }
    }

    #[test]
    fn commands_round_trip(
        ports in proptest::array::uniform5(prop::sample::select(vec![OutputAction::Off, OutputAction::On, OutputAction::Keep])),
        phone in "\\+?[0-9]{1,19}",
        text in "[ -)+\\--~]{1,60}",
        camera in any::<u8>(),
        packet in any::<u32>(),
    ) {
        let digits: String = ports.iter().map(|p| match p {
            OutputAction::Off => '0',
            OutputAction::On => '1',
            OutputAction::Keep => '2',
        }).collect();
        let cases = [
            (Command::RequestPosition, *b"A10", String::new()),
            (Command::SetOutputs(ports), *b"C01", format!("0,{digits}")),
            (Command::SendSms { phone: &phone, text: &text }, *b"C02", format!("0,{phone},{text}")),
            (Command::TakePhoto { camera, file: &text }, *b"D03", format!("{camera},{text}")),
            (Command::RequestPhotoPacket { file: &text, packet }, *b"D00", format!("{text},{packet}")),
        ];
        for (command, cmd, params) in cases {
            let mut raw = Vec::new();
            command.encode(b'Q', IMEI, &mut raw).expect("encodable");
            let frame = one_frame(&raw, Direction::ServerToDevice);
            prop_assert_eq!(frame.command(), cmd);
            prop_assert_eq!(frame.payload(), params.as_bytes());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// One bad record must not make a batch unconfirmable: the good records decode in
    /// order, the bad ones are reported, and the reply confirms the whole batch.
    #[test]
    fn bad_records_are_skipped_not_fatal(
        mut fixes in proptest::collection::vec(cce_fix(), 1..8),
        bad in proptest::collection::vec(any::<bool>(), 8),
        ccc in any::<bool>(),
    ) {
        for (f, &b) in fixes.iter_mut().zip(&bad) {
            if b {
                f.lat_e6 = Some(i32::MIN); // out of range: the record cannot be stored
            }
            if ccc {
                f.altitude_m = f.altitude_m.map(|a| a.abs());
                f.event = f.event.map(|e| e & 0xff);
            }
        }
        let mut payload = Vec::new();
        let raw = if ccc {
            encode::ccc_payload(&fixes, 3, &mut payload).expect("encodable");
            device_frame(b"CCC", &payload)
        } else {
            encode::cce_payload(&fixes, 3, &mut payload).expect("encodable");
            device_frame(b"CCE", &payload)
        };
        let msg = decode(&one_frame(&raw, Direction::DeviceToServer)).expect("batch header is fine");
        let good: Vec<_> = fixes.iter().filter(|f| f.lat_e6 != Some(i32::MIN)).collect();
        prop_assert_eq!(msg.fixes.len(), good.len());
        prop_assert_eq!(msg.rejected.len(), fixes.len() - good.len());
        prop_assert_eq!(msg.records as usize, fixes.len());
        for (got, sent) in msg.fixes.iter().zip(good) {
            prop_assert_eq!(got.time, sent.time);
        }
        let reply = expected_reply(&msg, true).expect("batches are confirmed");
        let n = fixes.len() as u32;
        let want = if ccc { Reply::Ccc { records: n } } else { Reply::Cce { records: n } };
        prop_assert_eq!(reply, want);
    }
}
