//! `StatusResponse`, written by hand so that an answer can be assembled
//! from targets encoded ahead of time.
//!
//! A Status answer of 1,000 targets is about half a megabyte, and almost
//! none of it changes between calls. The agent keeps each target's
//! `TargetStatus` as encoded bytes and sends them as they are: on the
//! wire, a `bytes` field and an embedded message are the same (field
//! number, length, contents), so `encoded_targets` is field 2 like
//! `targets`. Decoding reads every target into `targets`; a client never
//! sees the difference, and the schema is the one in `agent.proto`.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use prost::DecodeError;
use prost::encoding::{self, DecodeContext, WireType};

use crate::agent::v1::{AgentInfo, TargetStatus};

/// The answer to `Status` (`certctl.agent.v1.StatusResponse`).
#[derive(Clone, PartialEq, Default, Debug)]
pub struct StatusResponse {
    /// Field 1.
    pub agent: Option<AgentInfo>,
    /// Field 2, as messages. Every decoded target lands here.
    pub targets: Vec<TargetStatus>,
    /// Field 2 as well: each element one `TargetStatus` already encoded
    /// (`prost::Message::encode_to_vec`), sent after `targets`. Never
    /// filled by decoding. Shared: the calls that one look at every
    /// target answers hold the same list, not a copy each.
    pub encoded_targets: Arc<[Bytes]>,
}

const AGENT: u32 = 1;
const TARGETS: u32 = 2;

impl prost::Message for StatusResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(agent) = &self.agent {
            encoding::message::encode(AGENT, agent, buf);
        }
        for t in &self.targets {
            encoding::message::encode(TARGETS, t, buf);
        }
        for t in self.encoded_targets.iter() {
            encoding::bytes::encode(TARGETS, t, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            AGENT => encoding::message::merge(
                wire_type,
                self.agent.get_or_insert_with(AgentInfo::default),
                buf,
                ctx,
            )
            .map_err(|mut e| {
                e.push("StatusResponse", "agent");
                e
            }),
            TARGETS => encoding::message::merge_repeated(wire_type, &mut self.targets, buf, ctx)
                .map_err(|mut e| {
                    e.push("StatusResponse", "targets");
                    e
                }),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.agent
            .as_ref()
            .map_or(0, |a| encoding::message::encoded_len(AGENT, a))
            + encoding::message::encoded_len_repeated(TARGETS, &self.targets)
            + self
                .encoded_targets
                .iter()
                .map(|t| encoding::bytes::encoded_len(TARGETS, t))
                .sum::<usize>()
    }

    fn clear(&mut self) {
        self.agent = None;
        self.targets.clear();
        self.encoded_targets = Arc::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn target(name: &str) -> TargetStatus {
        TargetStatus {
            name: name.to_owned(),
            kind: "nginx".to_owned(),
            cert_sha256: "ab".repeat(32),
            not_after_unix: 1_900_000_000,
            busy: true,
            ..TargetStatus::default()
        }
    }

    fn agent() -> Option<AgentInfo> {
        Some(AgentInfo {
            version: "1.2.3".to_owned(),
            pid: 42,
            ..AgentInfo::default()
        })
    }

    #[test]
    fn encoded_targets_are_the_same_bytes_as_messages() {
        let as_messages = StatusResponse {
            agent: agent(),
            targets: vec![target("a"), target("b")],
            encoded_targets: Arc::default(),
        };
        let as_parts = StatusResponse {
            agent: agent(),
            targets: Vec::new(),
            encoded_targets: vec![
                Bytes::from(target("a").encode_to_vec()),
                Bytes::from(target("b").encode_to_vec()),
            ]
            .into(),
        };
        let wire = as_parts.encode_to_vec();
        assert_eq!(wire, as_messages.encode_to_vec());
        assert_eq!(wire.len(), as_parts.encoded_len());
        let back = StatusResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(back, as_messages);
    }

    #[test]
    fn messages_come_before_parts_and_an_empty_target_still_counts() {
        let mixed = StatusResponse {
            agent: None,
            targets: vec![target("a")],
            encoded_targets: vec![Bytes::new(), Bytes::from(target("c").encode_to_vec())].into(),
        };
        let back = StatusResponse::decode(mixed.encode_to_vec().as_slice()).unwrap();
        let names: Vec<_> = back.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "", "c"]);
        assert!(back.agent.is_none());
    }

    #[test]
    fn a_truncated_answer_is_an_error_naming_the_field() {
        let wire = StatusResponse {
            agent: agent(),
            targets: vec![target("a")],
            encoded_targets: Arc::default(),
        }
        .encode_to_vec();
        let err = StatusResponse::decode(&wire[..wire.len() - 3]).unwrap_err();
        assert!(err.to_string().contains("StatusResponse.targets"), "{err}");
    }

    #[test]
    fn a_target_of_the_wrong_wire_type_or_length_is_an_error() {
        // Field 2 as a varint: not a message.
        let err = StatusResponse::decode(&[2 << 3, 1][..]).unwrap_err();
        assert!(err.to_string().contains("StatusResponse.targets"), "{err}");
        // Field 2 claiming 100 bytes with 2 behind it.
        let err = StatusResponse::decode(&[(2 << 3) | 2, 100, 0x0a, 0][..]).unwrap_err();
        assert!(err.to_string().contains("StatusResponse.targets"), "{err}");
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut wire = StatusResponse {
            agent: agent(),
            ..StatusResponse::default()
        }
        .encode_to_vec();
        // Field 9, varint 7: from a newer agent.
        wire.extend_from_slice(&[9 << 3, 7]);
        let back = StatusResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(back.agent, agent());
    }
}
