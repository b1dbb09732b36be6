//! The password handshake that admits a control connection into the mesh.
//!
//! It runs on the first bidirectional stream of a fresh QUIC connection, opened by the dialing side (the
//! initiator). Steps, each a length-prefixed frame:
//!
//! 1. initiator -> `Hello`; responder checks the protocol version and that both sides agree on whether a
//!    password is set, then answers with its own `Hello`.
//! 2. With a password both sides run SPAKE2 (symmetric mode): each sends one message, each derives a key
//!    `K`. A passive observer sees nothing (it is inside TLS) and an active one gets one online guess per
//!    connection: no captured or provoked handshake lets anyone test passwords offline.
//! 3. The initiator proves first: `HMAC(K, "initiator" || transcript)`, where the transcript is a TLS
//!    exporter value of this very connection plus both `Hello`s, so the proof can't be relayed into another
//!    connection. The responder checks it and only then proves itself the same way.
//!
//! A refusal is a frame that starts with [`REFUSE`] followed by UTF-8 text, understood by every protocol
//! version, so the side that is turned away always learns why. Afterwards the stream carries mesh messages.
//!
//! Keys for the sleeve come from a second exporter value mixed with `K` (see [`Established::sleeve_secret`]);
//! without a password they come from the exporter alone and the sleeve does not seal.

use std::fmt;

use mesh::{PeerName, PROTOCOL_VERSION};
use ring::hmac;
use serde::{Deserialize, Serialize};
use spake2::{Ed25519Group, Identity, Password, Spake2};

/// First byte of a refusal frame (never a valid protocol version).
pub(crate) const REFUSE: u8 = 0xff;
/// Largest frame accepted on a control stream (handshake or mesh message).
pub(crate) const FRAME_MAX_BYTES: usize = 16 << 20;
const EXPORTER_HANDSHAKE: &[u8] = b"meshctl handshake v1";
const EXPORTER_SLEEVE: &[u8] = b"meshctl sleeve v1";
const SPAKE2_IDENTITY: &[u8] = b"meshctl mesh v1";

/// What a router tells a peer about itself when a connection opens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) name: PeerName,
    pub(crate) nickname: String,
    /// Whether this router has a mesh password (and so seals its sleeve traffic).
    pub(crate) sealed: bool,
    /// UDP port of this router's sleeve.
    pub(crate) data_port: u16,
    /// The receiver index the peer must put on sleeve datagrams for us.
    pub(crate) session_index: u32,
    /// The kernel VXLAN fast path, if this router offers it: the first value of the trailer
    /// (see [`emit`]), so `None` when absent.
    #[serde(skip)]
    pub(crate) vxlan: Option<VxlanHello>,
    /// What this router's sleeve can do: the second value of the trailer, defaults when absent.
    #[serde(skip)]
    pub(crate) ext: HelloExt,
    /// Datagrams per sleeve key as a power of two: the third value of the trailer, `None` from
    /// routers that never rotate keys.
    #[serde(skip)]
    pub(crate) epoch_shift: Option<u8>,
}

/// How to reach a router's VXLAN device.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct VxlanHello {
    /// UDP port of its VXLAN device.
    pub(crate) port: u16,
    /// Its VNI; the fast path works only between equal VNIs.
    pub(crate) vni: u32,
    /// MAC address of its VXLAN device (where probes are addressed).
    pub(crate) mac: [u8; 6],
}

/// What a router's sleeve can do; the second trailer value of its `Hello` (see [`emit`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct HelloExt {
    /// The sleeve joins super-frame segments (`FLAG_SEGMENT` datagrams).
    pub(crate) offload: bool,
    /// The CPU has fast AES instructions.
    pub(crate) aes_fast: bool,
    /// The cipher forced with `--cipher` (`Cipher::code`), if any.
    pub(crate) cipher: Option<u8>,
}

#[derive(Serialize, Deserialize)]
enum Step {
    Hello(Hello),
    Pake(Vec<u8>),
    Confirm(Vec<u8>),
}

/// Why a handshake failed; the control loop reports these in status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HandshakeError {
    /// The two routers do not share the mesh password (or only one has one).
    PasswordMismatch { detail: String },
    /// The remote speaks another protocol version.
    ProtocolVersion { got: u8, supported: u8 },
    /// The remote refused us for a reason it stated.
    Refused { reason: String },
    /// The remote sent something that is not a valid handshake step.
    Malformed { reason: String },
    /// The QUIC connection or stream failed.
    Transport { reason: String },
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::PasswordMismatch { detail } => write!(f, "password mismatch: {detail}"),
            HandshakeError::ProtocolVersion { got, supported } => write!(
                f,
                "protocol version mismatch: the peer speaks version {got}, this router speaks {supported}; \
                 run the same meshctl release on both hosts"
            ),
            HandshakeError::Refused { reason } => write!(f, "refused by peer: {reason}"),
            HandshakeError::Malformed { reason } => write!(f, "malformed handshake: {reason}"),
            HandshakeError::Transport { reason } => write!(f, "connection failed: {reason}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// What both sides know after a successful handshake.
pub(crate) struct Established {
    pub(crate) remote: Hello,
    pub(crate) initiator: bool,
    /// Secret that both sides hold, from which the per-direction sleeve keys are derived.
    pub(crate) sleeve_secret: Vec<u8>,
}

/// Runs the handshake on `stream` as the initiator (we dialed).
pub(crate) async fn initiate(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    ours: &Hello,
    password: Option<&str>,
) -> Result<Established, HandshakeError> {
    let hello_ours = emit(&Step::Hello(ours.clone()));
    write_frame(send, &hello_ours).await?;
    let hello_theirs_bytes = read_frame(recv).await?;
    let theirs = match parse(&hello_theirs_bytes)? {
        Step::Hello(h) => h,
        _ => return Err(malformed("expected Hello")),
    };
    check_sealed(ours, &theirs)?;
    let transcript = transcript(conn, &hello_ours, &hello_theirs_bytes)?;
    let key = match password {
        None => Vec::new(),
        Some(password) => {
            let (spake, msg) = start_pake(password);
            write_frame(send, &emit(&Step::Pake(msg))).await?;
            let theirs_msg = match parse(&read_frame(recv).await?)? {
                Step::Pake(m) => m,
                _ => return Err(malformed("expected SPAKE2 message")),
            };
            let key = spake
                .finish(&theirs_msg)
                .map_err(|e| malformed(&format!("SPAKE2: {e}")))?;
            let key_hmac = hmac::Key::new(hmac::HMAC_SHA256, &key);
            let proof = prove(&key_hmac, b"initiator", &transcript);
            write_frame(send, &emit(&Step::Confirm(proof))).await?;
            match parse(&read_frame(recv).await?)? {
                Step::Confirm(p) if verify(&key_hmac, b"responder", &transcript, &p) => {}
                Step::Confirm(_) => {
                    return Err(HandshakeError::PasswordMismatch {
                        detail: "the peer could not prove it knows this mesh's password".into(),
                    })
                }
                _ => return Err(malformed("expected confirmation")),
            }
            key
        }
    };
    Ok(Established {
        remote: theirs,
        initiator: true,
        sleeve_secret: sleeve_secret(conn, &key)?,
    })
}

/// Runs the handshake as the responder (the peer dialed us). On failure we tell the peer why before
/// returning the error, so both sides report the same cause, each from its own point of view.
pub(crate) async fn respond(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    ours: &Hello,
    password: Option<&str>,
) -> Result<Established, HandshakeError> {
    match respond_inner(conn, send, recv, ours, password).await {
        Ok(established) => Ok(established),
        Err(Refusal { error, tell }) => {
            if let Some(reason) = tell {
                let mut frame = vec![REFUSE];
                frame.extend_from_slice(reason.as_bytes());
                let _ = write_frame(send, &frame).await;
                let _ = send.finish();
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            }
            Err(error)
        }
    }
}

/// A responder-side failure: our error, and what to tell the peer (from its point of view), if anything.
struct Refusal {
    error: HandshakeError,
    tell: Option<String>,
}

impl From<HandshakeError> for Refusal {
    fn from(error: HandshakeError) -> Refusal {
        let tell = match &error {
            HandshakeError::Transport { .. } | HandshakeError::Refused { .. } => None,
            other => Some(other.to_string()),
        };
        Refusal { error, tell }
    }
}

fn mismatch(detail: String, tell: &str) -> Refusal {
    Refusal {
        error: HandshakeError::PasswordMismatch { detail },
        tell: Some(format!("password mismatch: {tell}")),
    }
}

async fn respond_inner(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    ours: &Hello,
    password: Option<&str>,
) -> Result<Established, Refusal> {
    let hello_theirs_bytes = read_frame(recv).await?;
    let theirs = match parse(&hello_theirs_bytes)? {
        Step::Hello(h) => h,
        _ => return Err(malformed("expected Hello").into()),
    };
    if let Err(HandshakeError::PasswordMismatch { detail }) = check_sealed(ours, &theirs) {
        let tell = if ours.sealed {
            "the router you dialed has a mesh password and you have none"
        } else {
            "the router you dialed has no mesh password and you have one"
        };
        return Err(mismatch(detail, tell));
    }
    let hello_ours = emit(&Step::Hello(ours.clone()));
    write_frame(send, &hello_ours).await?;
    // The transcript is always in initiator, responder order.
    let transcript = transcript(conn, &hello_theirs_bytes, &hello_ours)?;
    let key = match password {
        None => Vec::new(),
        Some(password) => {
            let (spake, msg) = start_pake(password);
            write_frame(send, &emit(&Step::Pake(msg))).await?;
            let theirs_msg = match parse(&read_frame(recv).await?)? {
                Step::Pake(m) => m,
                _ => return Err(malformed("expected SPAKE2 message").into()),
            };
            let key = spake
                .finish(&theirs_msg)
                .map_err(|e| Refusal::from(malformed(&format!("SPAKE2: {e}"))))?;
            let key_hmac = hmac::Key::new(hmac::HMAC_SHA256, &key);
            match parse(&read_frame(recv).await?)? {
                Step::Confirm(p) if verify(&key_hmac, b"initiator", &transcript, &p) => {}
                Step::Confirm(_) => {
                    return Err(mismatch(
                        format!(
                            "peer {} ({}) presented another mesh password",
                            theirs.nickname, theirs.name
                        ),
                        "the router you dialed has a different mesh password",
                    ))
                }
                _ => return Err(malformed("expected confirmation").into()),
            }
            let proof = prove(&key_hmac, b"responder", &transcript);
            write_frame(send, &emit(&Step::Confirm(proof))).await?;
            key
        }
    };
    Ok(Established {
        remote: theirs,
        initiator: false,
        sleeve_secret: sleeve_secret(conn, &key)?,
    })
}

fn check_sealed(ours: &Hello, theirs: &Hello) -> Result<(), HandshakeError> {
    match (ours.sealed, theirs.sealed) {
        (true, false) => Err(HandshakeError::PasswordMismatch {
            detail: format!(
                "this router has a mesh password but peer {} ({}) has none",
                theirs.nickname, theirs.name
            ),
        }),
        (false, true) => Err(HandshakeError::PasswordMismatch {
            detail: format!(
                "peer {} ({}) has a mesh password but this router has none",
                theirs.nickname, theirs.name
            ),
        }),
        _ => Ok(()),
    }
}

fn start_pake(password: &str) -> (Spake2<Ed25519Group>, Vec<u8>) {
    Spake2::<Ed25519Group>::start_symmetric(
        &Password::new(password.as_bytes()),
        &Identity::new(SPAKE2_IDENTITY),
    )
}

fn prove(key: &hmac::Key, role: &[u8], transcript: &[u8]) -> Vec<u8> {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(role);
    ctx.update(transcript);
    ctx.sign().as_ref().to_vec()
}

fn verify(key: &hmac::Key, role: &[u8], transcript: &[u8], proof: &[u8]) -> bool {
    let mut msg = role.to_vec();
    msg.extend_from_slice(transcript);
    hmac::verify(key, &msg, proof).is_ok()
}

fn transcript(
    conn: &quinn::Connection,
    hello_initiator: &[u8],
    hello_responder: &[u8],
) -> Result<Vec<u8>, HandshakeError> {
    let mut t = vec![0u8; 32];
    conn.export_keying_material(&mut t, EXPORTER_HANDSHAKE, b"")
        .map_err(|_| transport("TLS exporter unavailable"))?;
    for part in [hello_initiator, hello_responder] {
        t.extend_from_slice(&(part.len() as u32).to_be_bytes());
        t.extend_from_slice(part);
    }
    Ok(t)
}

fn sleeve_secret(conn: &quinn::Connection, key: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    let mut s = vec![0u8; 32];
    conn.export_keying_material(&mut s, EXPORTER_SLEEVE, b"")
        .map_err(|_| transport("TLS exporter unavailable"))?;
    s.extend_from_slice(key);
    Ok(s)
}

fn emit(step: &Step) -> Vec<u8> {
    let mut out = vec![PROTOCOL_VERSION];
    out.extend(postcard::to_stdvec(step).expect("invariant: handshake steps always serialize"));
    if let Step::Hello(hello) = step {
        // The trailer: extension values in the order they were introduced, each a postcard
        // value of its own. A reader takes the values it knows and ignores the rest, so a new
        // extension is only ever appended after the last one.
        out.extend(postcard::to_stdvec(&hello.vxlan).expect("invariant: VxlanHello serializes"));
        out.extend(postcard::to_stdvec(&hello.ext).expect("invariant: HelloExt serializes"));
        out.extend(
            postcard::to_stdvec(&hello.epoch_shift).expect("invariant: an Option<u8> serializes"),
        );
    }
    out
}

fn parse(frame: &[u8]) -> Result<Step, HandshakeError> {
    match frame.first() {
        None => Err(malformed("empty frame")),
        Some(&REFUSE) => {
            let reason = String::from_utf8_lossy(&frame[1..]).into_owned();
            match reason.strip_prefix("password mismatch: ") {
                Some(detail) => Err(HandshakeError::PasswordMismatch {
                    detail: detail.to_string(),
                }),
                None => Err(HandshakeError::Refused { reason }),
            }
        }
        Some(&v) if v != PROTOCOL_VERSION => Err(HandshakeError::ProtocolVersion {
            got: v,
            supported: PROTOCOL_VERSION,
        }),
        Some(_) => {
            let (mut step, rest) = postcard::take_from_bytes::<Step>(&frame[1..])
                .map_err(|e| malformed(&e.to_string()))?;
            if let Step::Hello(hello) = &mut step {
                read_trailer(hello, rest)?;
            }
            Ok(step)
        }
    }
}

/// Reads the extension values after a `Hello` (see [`emit`]). Older routers stop early: what
/// they don't send keeps its default (no fast path, no offload, ChaCha20). Values from newer
/// routers after the last one known here are ignored.
fn read_trailer(hello: &mut Hello, rest: &[u8]) -> Result<(), HandshakeError> {
    if rest.is_empty() {
        return Ok(());
    }
    let (vxlan, rest) = postcard::take_from_bytes::<Option<VxlanHello>>(rest)
        .map_err(|e| malformed(&format!("hello extension (vxlan): {e}")))?;
    hello.vxlan = vxlan;
    if rest.is_empty() {
        return Ok(());
    }
    let (ext, rest) = postcard::take_from_bytes::<HelloExt>(rest)
        .map_err(|e| malformed(&format!("hello extension (sleeve): {e}")))?;
    hello.ext = ext;
    if rest.is_empty() {
        return Ok(());
    }
    let (epoch_shift, _newer) = postcard::take_from_bytes::<Option<u8>>(rest)
        .map_err(|e| malformed(&format!("hello extension (key epochs): {e}")))?;
    hello.epoch_shift = epoch_shift;
    Ok(())
}

fn malformed(reason: &str) -> HandshakeError {
    HandshakeError::Malformed {
        reason: reason.to_string(),
    }
}

fn transport(reason: &str) -> HandshakeError {
    HandshakeError::Transport {
        reason: reason.to_string(),
    }
}

/// Writes one length-prefixed frame.
pub(crate) async fn write_frame(
    send: &mut quinn::SendStream,
    bytes: &[u8],
) -> Result<(), HandshakeError> {
    let len = u32::try_from(bytes.len()).map_err(|_| malformed("frame too large"))?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| transport(&e.to_string()))?;
    send.write_all(bytes)
        .await
        .map_err(|e| transport(&e.to_string()))
}

/// Reads one length-prefixed frame of at most [`FRAME_MAX_BYTES`].
pub(crate) async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, HandshakeError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| transport(&read_error(e)))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_MAX_BYTES {
        return Err(malformed(&format!(
            "frame of {len} bytes exceeds {FRAME_MAX_BYTES}"
        )));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| transport(&read_error(e)))?;
    Ok(buf)
}

fn read_error(e: quinn::ReadExactError) -> String {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => "the peer closed the stream".to_string(),
        quinn::ReadExactError::ReadError(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(sealed: bool) -> Hello {
        Hello {
            name: PeerName(0x0102_0304_0506),
            nickname: "a".into(),
            sealed,
            data_port: 6784,
            session_index: 7,
            vxlan: None,
            ext: HelloExt {
                offload: true,
                aes_fast: true,
                cipher: Some(2),
            },
            epoch_shift: Some(22),
        }
    }

    #[test]
    fn refusal_with_password_text_parses_as_mismatch() {
        let mut frame = vec![REFUSE];
        frame.extend_from_slice(b"password mismatch: nope");
        assert!(matches!(
            parse(&frame),
            Err(HandshakeError::PasswordMismatch { .. })
        ));
    }

    #[test]
    fn unknown_version_is_named() {
        let mut frame = emit(&Step::Hello(hello(true)));
        frame[0] = 9;
        let err = parse(&frame).err().expect("version 9 must be refused");
        assert!(err.to_string().contains("version 9"), "{err}");
    }

    #[test]
    fn sealed_mismatch_is_a_password_mismatch_both_ways() {
        assert!(matches!(
            check_sealed(&hello(true), &hello(false)),
            Err(HandshakeError::PasswordMismatch { .. })
        ));
        assert!(matches!(
            check_sealed(&hello(false), &hello(true)),
            Err(HandshakeError::PasswordMismatch { .. })
        ));
        assert!(check_sealed(&hello(true), &hello(true)).is_ok());
    }

    #[test]
    fn pake_keys_agree_only_with_the_same_password() {
        let (a, ma) = start_pake("pw");
        let (b, mb) = start_pake("pw");
        assert_eq!(a.finish(&mb).unwrap(), b.finish(&ma).unwrap());
        let (a, ma) = start_pake("pw");
        let (b, mb) = start_pake("other");
        assert_ne!(a.finish(&mb).unwrap(), b.finish(&ma).unwrap());
    }

    /// The `Hello` of a router that predates the trailer.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct OldHello {
        name: PeerName,
        nickname: String,
        sealed: bool,
        data_port: u16,
        session_index: u32,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum OldStep {
        Hello(OldHello),
    }

    fn vxlan_hello() -> VxlanHello {
        VxlanHello {
            port: 6786,
            vni: 42,
            mac: [2, 0, 0, 0, 0, 1],
        }
    }

    /// What a router sends whose trailer holds only the given values.
    fn old_frame(hello: &Hello, vxlan: Option<Option<VxlanHello>>) -> Vec<u8> {
        let old = OldStep::Hello(OldHello {
            name: hello.name,
            nickname: hello.nickname.clone(),
            sealed: hello.sealed,
            data_port: hello.data_port,
            session_index: hello.session_index,
        });
        let mut frame = vec![PROTOCOL_VERSION];
        frame.extend(postcard::to_stdvec(&old).unwrap());
        if let Some(vxlan) = vxlan {
            frame.extend(postcard::to_stdvec(&vxlan).unwrap());
        }
        frame
    }

    #[test]
    fn hello_trailer_round_trips() {
        for vxlan in [None, Some(vxlan_hello())] {
            let mut ours = hello(true);
            ours.vxlan = vxlan;
            match parse(&emit(&Step::Hello(ours.clone()))).unwrap() {
                Step::Hello(h) => assert_eq!(h, ours),
                _ => panic!("expected Hello"),
            }
        }
    }

    #[test]
    fn older_routers_read_our_hello() {
        let mut ours = hello(true);
        ours.vxlan = Some(vxlan_hello());
        let frame = emit(&Step::Hello(ours));
        // A router without any extension reads the Hello and ignores the trailer.
        let (OldStep::Hello(old), _) = postcard::take_from_bytes::<OldStep>(&frame[1..]).unwrap();
        assert_eq!(old.session_index, 7);
        // A router that knows only the VXLAN value reads it and ignores what follows.
        let (_, rest) = postcard::take_from_bytes::<OldStep>(&frame[1..]).unwrap();
        let (vxlan, rest) = postcard::take_from_bytes::<Option<VxlanHello>>(rest).unwrap();
        assert_eq!(vxlan, Some(vxlan_hello()));
        assert!(!rest.is_empty(), "the sleeve extension follows");
    }

    #[test]
    fn we_read_older_and_newer_routers_hellos() {
        let ours = hello(false);
        // No trailer at all: no fast path, default sleeve capabilities.
        match parse(&old_frame(&ours, None)).unwrap() {
            Step::Hello(h) => {
                assert_eq!((h.vxlan, h.ext), (None, HelloExt::default()));
                assert_eq!(h.epoch_shift, None, "no key rotation with an old router");
                assert_eq!(h.session_index, 7);
            }
            _ => panic!("expected Hello"),
        }
        // Only the VXLAN value: the fast path, default sleeve capabilities.
        match parse(&old_frame(&ours, Some(Some(vxlan_hello())))).unwrap() {
            Step::Hello(h) => {
                assert_eq!((h.vxlan, h.ext), (Some(vxlan_hello()), HelloExt::default()));
            }
            _ => panic!("expected Hello"),
        }
        // A newer router's values after the ones known here are ignored.
        let mut newer = emit(&Step::Hello(ours.clone()));
        newer.extend_from_slice(&[7, 1, 2, 3, 0xff]);
        match parse(&newer).unwrap() {
            Step::Hello(h) => assert_eq!(h, ours),
            _ => panic!("expected Hello"),
        }
    }

    #[test]
    fn malformed_trailer_is_named() {
        let mut frame = old_frame(&hello(false), None);
        frame.push(9); // not an Option tag
        let err = parse(&frame)
            .err()
            .expect("a bad extension must be refused");
        assert!(err.to_string().contains("hello extension"), "{err}");
    }

    #[test]
    fn garbage_frames_never_panic() {
        for len in 0..64usize {
            let frame: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let _ = parse(&frame);
        }
    }
}
