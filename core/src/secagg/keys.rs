//! Key agreement, key derivation and share encryption.
//!
//! Every node draws two fresh X25519 key pairs per round (Bernstein 2006, "Curve25519: new
//! Diffie-Hellman speed records"): the *cipher* pair, whose agreements key the encryption of
//! share bundles, and the *mask* pair, whose agreements seed the pairwise masks. Keeping them
//! apart lets a dropped node's mask key be reconstructed without exposing the share
//! ciphertexts (Bonawitz et al. 2017, section 4).
//!
//! Agreed secrets go through HKDF-SHA256 (RFC 5869) with the round id as salt and an info
//! string made of a label naming the use, then the node ids involved, so a key serves one
//! purpose, in one round, between one pair (and for encryption, in one direction). Each
//! share key therefore encrypts exactly one message, which is why a fixed nonce is safe.
//! ChaCha20-Poly1305 (RFC 8439) binds the round, sender and recipient as associated data.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::CryptoRng;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};
use zeroize::Zeroizing;

use super::SecAggError;
use super::messages::{NodeId, RoundId};
use super::shamir::Secret;

/// HKDF info label of pairwise mask seeds.
const PAIRWISE_MASK_LABEL: &[u8] = b"athanor/secagg/v1/pairwise-mask-seed";

/// HKDF info label of share encryption keys.
const SHARE_KEY_LABEL: &[u8] = b"athanor/secagg/v1/share-encryption-key";

/// Hash prefix of self-mask seed commitments.
const COMMITMENT_LABEL: &[u8] = b"athanor/secagg/v1/self-mask-commitment";

/// Bytes of an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Bytes the AEAD adds to a plaintext (the Poly1305 tag).
pub const TAG_LEN: usize = 16;

/// A fresh X25519 key pair. The private half zeroizes on drop.
pub(crate) struct KeyPair {
    pub(crate) secret: StaticSecret,
    pub(crate) public: PublicKey,
}

impl KeyPair {
    pub(crate) fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> KeyPair {
        let secret = StaticSecret::random_from_rng(rng);
        let public = PublicKey::from(&secret);
        KeyPair { secret, public }
    }
}

/// Parses a 32-byte public key advertised by `node`.
///
/// # Errors
/// [`SecAggError::BadLength`] unless the key has 32 bytes, and
/// [`SecAggError::NonContributoryKey`] if it is a low-order point: agreeing with it gives
/// the all-zero secret whatever the private key, so it would make derived keys predictable.
pub fn parse_public_key(bytes: &[u8], node: NodeId) -> Result<PublicKey, SecAggError> {
    let array: [u8; PUBLIC_KEY_LEN] = bytes.try_into().map_err(|_| SecAggError::BadLength {
        what: "public key",
        expected: PUBLIC_KEY_LEN,
        got: bytes.len(),
    })?;
    let public = PublicKey::from(array);

    // X25519 clamps every scalar to a multiple of the cofactor 8, so a product with any fixed
    // scalar is the identity exactly when the point's order divides 8.
    let probe = StaticSecret::from([1; 32]);
    if !probe.diffie_hellman(&public).was_contributory() {
        return Err(SecAggError::NonContributoryKey { node });
    }
    Ok(public)
}

/// X25519 agreement with a peer's public key.
///
/// # Errors
/// [`SecAggError::NonContributoryKey`] if the result is all zeros (a low-order peer key).
pub(crate) fn agree(
    secret: &StaticSecret,
    peer_public: &PublicKey,
    peer: NodeId,
) -> Result<SharedSecret, SecAggError> {
    let shared = secret.diffie_hellman(peer_public);
    if !shared.was_contributory() {
        return Err(SecAggError::NonContributoryKey { node: peer });
    }
    Ok(shared)
}

/// The seed of the pairwise mask between `a` and `b` (either order).
pub(crate) fn pairwise_mask_seed(
    shared: &SharedSecret,
    round: RoundId,
    a: NodeId,
    b: NodeId,
) -> Zeroizing<[u8; 32]> {
    let (low, high) = if a < b { (a, b) } else { (b, a) };
    derive(shared.as_bytes(), round, PAIRWISE_MASK_LABEL, low, high)
}

/// The key that encrypts the one share bundle `sender` sends to `recipient`.
pub(crate) fn share_key(
    shared: &SharedSecret,
    round: RoundId,
    sender: NodeId,
    recipient: NodeId,
) -> Zeroizing<[u8; 32]> {
    derive(shared.as_bytes(), round, SHARE_KEY_LABEL, sender, recipient)
}

fn derive(
    shared: &[u8; 32],
    round: RoundId,
    label: &[u8],
    first: NodeId,
    second: NodeId,
) -> Zeroizing<[u8; 32]> {
    let hkdf = Hkdf::<Sha256>::new(Some(&round.0.to_be_bytes()), shared);
    let mut info = Vec::with_capacity(label.len() + 16);
    info.extend_from_slice(label);
    info.extend_from_slice(&first.0.to_be_bytes());
    info.extend_from_slice(&second.0.to_be_bytes());

    let mut okm = Zeroizing::new([0; 32]);
    // HKDF-SHA256 can expand up to 255 * 32 bytes; 32 always succeed.
    hkdf.expand(&info, okm.as_mut())
        .expect("32 bytes is within HKDF-SHA256's output limit");
    okm
}

/// `round || sender || recipient`, big-endian: the associated data of a share bundle.
pub fn associated_data(round: RoundId, sender: NodeId, recipient: NodeId) -> [u8; 24] {
    let mut ad = [0; 24];
    ad[..8].copy_from_slice(&round.0.to_be_bytes());
    ad[8..16].copy_from_slice(&sender.0.to_be_bytes());
    ad[16..].copy_from_slice(&recipient.0.to_be_bytes());
    ad
}

/// Encrypts a share bundle under a key used for this one message.
pub fn seal_share(key: &[u8; 32], associated_data: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    let payload = Payload {
        msg: plaintext,
        aad: associated_data,
    };
    // Encryption fails only for plaintexts beyond 2^38 bytes; bundles are about a hundred.
    cipher
        .encrypt(&Nonce::default(), payload)
        .expect("a share bundle is far below ChaCha20-Poly1305's length limit")
}

/// Decrypts and authenticates a share bundle.
///
/// # Errors
/// [`SecAggError::Decryption`] if the ciphertext or associated data was altered, or the key
/// is not the one it was sealed with.
pub fn open_share(
    key: &[u8; 32],
    associated_data: &[u8],
    ciphertext: &[u8],
    sender: NodeId,
    recipient: NodeId,
) -> Result<Zeroizing<Vec<u8>>, SecAggError> {
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    let payload = Payload {
        msg: ciphertext,
        aad: associated_data,
    };
    cipher
        .decrypt(&Nonce::default(), payload)
        .map(Zeroizing::new)
        .map_err(|_| SecAggError::Decryption { sender, recipient })
}

/// SHA-256 commitment to a node's self-mask seed, bound to the round and the node.
pub(crate) fn self_mask_commitment(round: RoundId, owner: NodeId, seed: &Secret) -> [u8; 32] {
    let digest = Sha256::new()
        .chain_update(COMMITMENT_LABEL)
        .chain_update(round.0.to_be_bytes())
        .chain_update(owner.0.to_be_bytes())
        .chain_update(seed.as_bytes())
        .finalize();
    digest.into()
}
