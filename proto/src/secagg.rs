//! Conversions between the secure-aggregation messages on the wire and
//! [`athanor_core::secagg::messages`].
//!
//! Both directions are field-for-field copies and check nothing: the core handlers validate
//! every field of what they receive (round, stage, sender, lengths), so a conversion that
//! refused anything would only duplicate them. Nodes and the coordinator both use these, which
//! is why they live with the generated code rather than on either side.
//!
//! Known shortcoming: revealed shares pass through prost's plain `Vec<u8>` buffers, which are
//! not zeroized when dropped (the core types are); the copies live for one request.

use athanor_core::secagg::messages as core;
use athanor_core::secagg::{NodeId, RoundId};

use crate::v1 as pb;

fn ids(nodes: &[NodeId]) -> Vec<u64> {
    nodes.iter().map(|n| n.0).collect()
}

fn node_ids(raw: &[u64]) -> Vec<NodeId> {
    raw.iter().copied().map(NodeId).collect()
}

impl From<pb::AdvertiseKeys> for core::AdvertiseKeys {
    fn from(m: pb::AdvertiseKeys) -> Self {
        core::AdvertiseKeys {
            round: RoundId(m.protocol_round),
            stage: m.stage,
            node: NodeId(m.node),
            cipher_public_key: m.cipher_public_key,
            mask_public_key: m.mask_public_key,
        }
    }
}

impl From<core::AdvertiseKeys> for pb::AdvertiseKeys {
    fn from(m: core::AdvertiseKeys) -> Self {
        pb::AdvertiseKeys {
            protocol_round: m.round.0,
            stage: m.stage,
            node: m.node.0,
            cipher_public_key: m.cipher_public_key,
            mask_public_key: m.mask_public_key,
        }
    }
}

impl From<pb::KeyDirectory> for core::KeyDirectory {
    fn from(m: pb::KeyDirectory) -> Self {
        core::KeyDirectory {
            round: RoundId(m.protocol_round),
            stage: m.stage,
            nodes: m
                .nodes
                .into_iter()
                .map(|k| core::NodeKeys {
                    node: NodeId(k.node),
                    cipher_public_key: k.cipher_public_key,
                    mask_public_key: k.mask_public_key,
                })
                .collect(),
        }
    }
}

impl From<core::KeyDirectory> for pb::KeyDirectory {
    fn from(m: core::KeyDirectory) -> Self {
        pb::KeyDirectory {
            protocol_round: m.round.0,
            stage: m.stage,
            nodes: m
                .nodes
                .into_iter()
                .map(|k| pb::NodeKeys {
                    node: k.node.0,
                    cipher_public_key: k.cipher_public_key,
                    mask_public_key: k.mask_public_key,
                })
                .collect(),
        }
    }
}

impl From<pb::EncryptedShare> for core::EncryptedShare {
    fn from(m: pb::EncryptedShare) -> Self {
        core::EncryptedShare {
            sender: NodeId(m.sender),
            recipient: NodeId(m.recipient),
            ciphertext: m.ciphertext,
        }
    }
}

impl From<core::EncryptedShare> for pb::EncryptedShare {
    fn from(m: core::EncryptedShare) -> Self {
        pb::EncryptedShare {
            sender: m.sender.0,
            recipient: m.recipient.0,
            ciphertext: m.ciphertext,
        }
    }
}

impl From<pb::ShareKeys> for core::ShareKeys {
    fn from(m: pb::ShareKeys) -> Self {
        core::ShareKeys {
            round: RoundId(m.protocol_round),
            stage: m.stage,
            node: NodeId(m.node),
            self_mask_commitment: m.self_mask_commitment,
            shares: m.shares.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<core::ShareKeys> for pb::ShareKeys {
    fn from(m: core::ShareKeys) -> Self {
        pb::ShareKeys {
            protocol_round: m.round.0,
            stage: m.stage,
            node: m.node.0,
            self_mask_commitment: m.self_mask_commitment,
            shares: m.shares.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::ShareInbox> for core::ShareInbox {
    fn from(m: pb::ShareInbox) -> Self {
        core::ShareInbox {
            round: RoundId(m.protocol_round),
            stage: m.stage,
            recipient: NodeId(m.recipient),
            shares: m.shares.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<core::ShareInbox> for pb::ShareInbox {
    fn from(m: core::ShareInbox) -> Self {
        pb::ShareInbox {
            protocol_round: m.round.0,
            stage: m.stage,
            recipient: m.recipient.0,
            shares: m.shares.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::UnmaskRequest> for core::UnmaskRequest {
    fn from(m: pb::UnmaskRequest) -> Self {
        core::UnmaskRequest {
            round: RoundId(m.protocol_round),
            stage: m.stage,
            recipient: NodeId(m.recipient),
            alive: node_ids(&m.alive),
            dropped: node_ids(&m.dropped),
        }
    }
}

impl From<core::UnmaskRequest> for pb::UnmaskRequest {
    fn from(m: core::UnmaskRequest) -> Self {
        pb::UnmaskRequest {
            protocol_round: m.round.0,
            stage: m.stage,
            recipient: m.recipient.0,
            alive: ids(&m.alive),
            dropped: ids(&m.dropped),
        }
    }
}

fn revealed_from_wire(shares: Vec<pb::RevealedShare>) -> Vec<core::RevealedShare> {
    shares
        .into_iter()
        .map(|s| core::RevealedShare {
            owner: NodeId(s.owner),
            share: s.share,
        })
        .collect()
}

fn revealed_to_wire(shares: &[core::RevealedShare]) -> Vec<pb::RevealedShare> {
    shares
        .iter()
        .map(|s| pb::RevealedShare {
            owner: s.owner.0,
            share: s.share.clone(),
        })
        .collect()
}

impl From<pb::UnmaskResponse> for core::UnmaskResponse {
    fn from(m: pb::UnmaskResponse) -> Self {
        core::UnmaskResponse {
            round: RoundId(m.protocol_round),
            stage: m.stage,
            node: NodeId(m.node),
            self_mask_shares: revealed_from_wire(m.self_mask_shares),
            mask_key_shares: revealed_from_wire(m.mask_key_shares),
        }
    }
}

impl From<&core::UnmaskResponse> for pb::UnmaskResponse {
    fn from(m: &core::UnmaskResponse) -> Self {
        pb::UnmaskResponse {
            protocol_round: m.round.0,
            stage: m.stage,
            node: m.node.0,
            self_mask_shares: revealed_to_wire(&m.self_mask_shares),
            mask_key_shares: revealed_to_wire(&m.mask_key_shares),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_survives_a_round_trip_through_the_wire_types() {
        let share = core::EncryptedShare {
            sender: NodeId(3),
            recipient: NodeId(9),
            ciphertext: vec![1, 2, 3],
        };
        let advertise = core::AdvertiseKeys {
            round: RoundId(77),
            stage: 0,
            node: NodeId(3),
            cipher_public_key: vec![5; 32],
            mask_public_key: vec![6; 32],
        };
        let back: core::AdvertiseKeys = pb::AdvertiseKeys::from(advertise.clone()).into();
        assert_eq!(back, advertise);

        let directory = core::KeyDirectory {
            round: RoundId(77),
            stage: 1,
            nodes: vec![core::NodeKeys {
                node: NodeId(3),
                cipher_public_key: vec![5; 32],
                mask_public_key: vec![6; 32],
            }],
        };
        let back: core::KeyDirectory = pb::KeyDirectory::from(directory.clone()).into();
        assert_eq!(back, directory);

        let shares = core::ShareKeys {
            round: RoundId(77),
            stage: 1,
            node: NodeId(3),
            self_mask_commitment: vec![8; 32],
            shares: vec![share.clone()],
        };
        let back: core::ShareKeys = pb::ShareKeys::from(shares.clone()).into();
        assert_eq!(back, shares);

        let inbox = core::ShareInbox {
            round: RoundId(77),
            stage: 2,
            recipient: NodeId(9),
            shares: vec![share],
        };
        let back: core::ShareInbox = pb::ShareInbox::from(inbox.clone()).into();
        assert_eq!(back, inbox);

        let request = core::UnmaskRequest {
            round: RoundId(77),
            stage: 3,
            recipient: NodeId(9),
            alive: vec![NodeId(3), NodeId(9)],
            dropped: vec![NodeId(4)],
        };
        let back: core::UnmaskRequest = pb::UnmaskRequest::from(request.clone()).into();
        assert_eq!(back, request);

        let response = core::UnmaskResponse {
            round: RoundId(77),
            stage: 3,
            node: NodeId(9),
            self_mask_shares: vec![core::RevealedShare {
                owner: NodeId(3),
                share: vec![1; 16],
            }],
            mask_key_shares: vec![core::RevealedShare {
                owner: NodeId(4),
                share: vec![2; 16],
            }],
        };
        let back: core::UnmaskResponse = pb::UnmaskResponse::from(&response).into();
        assert_eq!(back, response);
    }
}
