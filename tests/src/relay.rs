//! A relay on the path between a client and a KRE, as the parent (or anyone between a control
//! plane and the proxy) can run one: it forwards frames, or answers in the KRE's place with
//! everything that crosses the wire — the transcript values, the client's public key from the
//! client's own document — and keys of its own choice. The tests show what the client refuses.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keygate_attestation::crypto::default_backend;
use keygate_attestation::secret::Secret;
use keygate_attestation::{TrustAnchor, Verifier, VerifyOptions};
use keygate_enclave::audit::{AuditSigner, Receipt};
use keygate_enclave::crypto::keys::{self, Transcript, WrappingKey};
use keygate_enclave::wire::{self, Message};
use sha2::{Digest, Sha384};

/// The key a relay wants the control plane to use: the operator knows it.
pub const ATTACKER_KEY: [u8; 32] = [0xa7; 32];

/// What the relay does to each handshake it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// Forwards every frame unchanged.
    Forward,
    /// Forwards Hello and the genuine Challenge, then answers the Release itself: its own
    /// wrapping key, the transcript from the values it saw, [`ATTACKER_KEY`] for every key id
    /// at version 1 (or at the version given by [`Relay::set_version`]).
    SubstituteReleased,
    /// Puts its own point into the KRE's document in place of the attested one, then answers
    /// the Release as above.
    SubstituteChallengePoint,
    /// Flips a bit of the KRE's COSE signature, then answers the Release as above.
    SubstituteChallengeSignature,
    /// Hands the client a genuine Challenge for another Hello nonce (another connection's),
    /// then answers the Release as above.
    SpliceChallenge,
    /// Forwards the whole handshake, then replaces the audit receipt in the KRE's genuine
    /// Released with the receipt of the previous release it carried (a receipt whose entry the
    /// parent did store, in place of this release's), or, before it has carried one, with the
    /// genuine receipt naming the next sequence number.
    ReplaceReceipt,
}

impl Attack {
    /// Its index in [`Attack::ALL`].
    fn index(self) -> u8 {
        Attack::ALL.iter().position(|a| *a == self).and_then(|i| u8::try_from(i).ok()).unwrap_or(0)
    }

    const ALL: [Attack; 6] = [
        Attack::Forward,
        Attack::SubstituteReleased,
        Attack::SubstituteChallengePoint,
        Attack::SubstituteChallengeSignature,
        Attack::SpliceChallenge,
        Attack::ReplaceReceipt,
    ];
}

/// A relay serving connections on a Unix socket until dropped.
#[derive(Debug)]
pub struct Relay {
    listen: PathBuf,
    attack: Arc<AtomicU8>,
    version: Arc<std::sync::atomic::AtomicU32>,
    handled: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The receipt of the last genuine Released the relay carried.
type LastReceipt = Arc<std::sync::Mutex<Option<Receipt>>>;

impl Relay {
    /// Listens on `listen`, relaying to the KRE at `kre`; `client_root` verifies the clients'
    /// documents (to read their public keys, as anyone can).
    pub fn start(listen: &Path, kre: &Path, client_root: TrustAnchor, attack: Attack) -> Relay {
        let listener = UnixListener::bind(listen).expect("relay bind");
        let attack = Arc::new(AtomicU8::new(attack.index()));
        let version = Arc::new(std::sync::atomic::AtomicU32::new(1));
        let handled = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, v, h, s, kre) = (attack.clone(), version.clone(), handled.clone(), stop.clone(), kre.to_path_buf());
        let acc = accepted.clone();
        let verifier = Verifier::new(client_root);
        let last: LastReceipt = Arc::default();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                acc.fetch_add(1, Ordering::SeqCst);
                let attack = Attack::ALL[usize::from(a.load(Ordering::SeqCst))];
                // A failed relay step is the client hanging up on a refused answer.
                let _ = relay_one(client, &kre, attack, v.load(Ordering::SeqCst), &verifier, &last);
                h.fetch_add(1, Ordering::SeqCst);
            }
        });
        Relay { listen: listen.to_path_buf(), attack, version, handled, accepted, stop, thread: Some(thread) }
    }

    /// Changes what the relay does from the next connection on.
    pub fn set(&self, attack: Attack) {
        self.attack.store(attack.index(), Ordering::SeqCst);
    }

    /// The KEK version the substituted keys claim.
    pub fn set_version(&self, version: u32) {
        self.version.store(version, Ordering::SeqCst);
    }

    /// Connections relayed so far.
    pub fn handled(&self) -> usize {
        self.handled.load(Ordering::SeqCst)
    }

    /// Connections accepted so far (counted when accepted, before they are relayed).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections relayed so far, once at least `n` are (or after 5 s): the relay counts a
    /// connection after the client may already have read its answer and exited.
    pub fn handled_at_least(&self, n: usize) -> usize {
        let start = std::time::Instant::now();
        while self.handled() < n && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.handled()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.listen);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A handshake step; the relay drops the connection on any error (the test sees the client's
/// side), so the error only has to exist.
type Step<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn read_body(s: &mut UnixStream) -> Step<Vec<u8>> {
    let mut p = [0u8; 4];
    s.read_exact(&mut p)?;
    let mut body = vec![0u8; wire::frame_len(p)?];
    s.read_exact(&mut body)?;
    Ok(body)
}

fn send(s: &mut UnixStream, frame: &[u8]) -> Step<()> {
    Ok(s.write_all(frame)?)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("frame length");
    [len.to_be_bytes().as_slice(), body].concat()
}

fn decode(body: &[u8]) -> Step<Message> {
    Ok(Message::decode(body)?)
}

fn relay_one(
    mut client: UnixStream,
    kre: &Path,
    attack: Attack,
    version: u32,
    verifier: &Verifier,
    last: &LastReceipt,
) -> Step<()> {
    let limit = Some(Duration::from_secs(10));
    client.set_read_timeout(limit)?;
    let mut upstream = UnixStream::connect(kre)?;
    upstream.set_read_timeout(limit)?;
    let hello = read_body(&mut client)?;
    if matches!(attack, Attack::Forward | Attack::ReplaceReceipt) {
        // One handshake: Hello → Challenge, then Release → its answer.
        let mut body = hello;
        loop {
            send(&mut upstream, &frame(&body))?;
            let mut reply = read_body(&mut upstream)?;
            if let Message::Released { ephemeral_point, keys, receipt } = decode(&reply)? {
                let mut held = last.lock().map_err(|_| "the last receipt's lock is poisoned")?;
                let previous = held.replace((*receipt).clone());
                if attack == Attack::ReplaceReceipt {
                    let other = match previous {
                        Some(r) => r,
                        None => Receipt::assemble(
                            *receipt.chain_id(),
                            receipt.seq() + 1,
                            *receipt.entry_digest(),
                            *receipt.document_sha384(),
                            *receipt.public_key(),
                            *receipt.signature(),
                        )?,
                    };
                    let swapped = Message::Released { ephemeral_point, keys, receipt: Box::new(other) };
                    reply = swapped.encode()?.split_off(4);
                }
            }
            send(&mut client, &frame(&reply))?;
            if !matches!(decode(&reply)?, Message::Challenge { .. }) {
                return Ok(());
            }
            body = read_body(&mut client)?;
        }
    }
    let Message::Hello { client_nonce } = decode(&hello)? else { return Err("expected Hello".into()) };
    let upstream_nonce = if attack == Attack::SpliceChallenge { [0x55; 32] } else { client_nonce };
    send(&mut upstream, &Message::Hello { client_nonce: upstream_nonce }.encode()?)?;
    let Message::Challenge { server_nonce, mut kre_attestation } = decode(&read_body(&mut upstream)?)? else {
        return Err("expected Challenge".into());
    };
    let crypto = default_backend();
    let mine = WrappingKey::generate(crypto, |b| b.fill(0x42))?;
    match attack {
        Attack::SubstituteChallengePoint => {
            // The attested 97-byte point follows its CBOR byte-string head (0x58 0x61).
            let at = kre_attestation
                .windows(3)
                .position(|w| w == [0x58, 0x61, 0x04])
                .ok_or("no point in the KRE's document")?
                + 2;
            kre_attestation[at..at + 97].copy_from_slice(mine.point());
        }
        Attack::SubstituteChallengeSignature => {
            let last = kre_attestation.len() - 1;
            kre_attestation[last] ^= 1;
        }
        _ => {}
    }
    let challenge = Message::Challenge { server_nonce, kre_attestation: kre_attestation.clone() };
    send(&mut client, &challenge.encode()?)?;
    // A client that refused the Challenge hangs up here.
    let Message::Release { cluster_id, key_ids, attestation } = decode(&read_body(&mut client)?)? else {
        return Err("expected Release".into());
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let mut opts = VerifyOptions::at(u64::try_from(now.as_millis())?);
    opts.allow_debug = true;
    let client_doc = verifier.verify(&attestation, &opts)?;
    let t = Transcript {
        client_nonce,
        server_nonce,
        kre_attestation_sha384: Sha384::digest(&kre_attestation).into(),
        client_attestation_sha384: Sha384::digest(&attestation).into(),
        request_digest: wire::request_digest(&cluster_id, &key_ids),
    };
    let chosen: Vec<_> = key_ids.iter().map(|k| (k.clone(), version, Secret::new(ATTACKER_KEY))).collect();
    let client_point = client_doc.public_key().ok_or("client document without public_key")?;
    // A receipt the relay signs itself, for this client's document (it has no KRE's key).
    let signer = AuditSigner::generate(crypto, |b| b.fill(0x43))?;
    let receipt = signer.sign_receipt(1, [0; 48], t.client_attestation_sha384)?;
    let (ephemeral_point, keys) = keys::wrap_bound(crypto, &t, client_point, &chosen, mine, &receipt.to_bytes())?;
    send(&mut client, &Message::Released { ephemeral_point, keys, receipt: Box::new(receipt) }.encode()?)
}
