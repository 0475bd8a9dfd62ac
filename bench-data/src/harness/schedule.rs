//! The order the main table runs the tools in: interleaved rounds.
//!
//! The disk this benchmark runs on has a burst budget (DESIGN-NOTES fact 12): after tens of GB
//! of I/O its reads slow down several-fold, so a tool that runs after another pays for the
//! other's I/O. Each round therefore gives every tool a fresh copy, and every peer runs right
//! next to a run of the reference tool (cowherd), whose time it is compared with:
//!
//! * the peers, rotated by one place per round, are taken two at a time around a cowherd run:
//!   `peer, cowherd, peer` — one peer runs just before that cowherd run, the other just after;
//! * a peer left over (an odd number of peers) runs after cowherd in even rounds
//!   (`cowherd, peer`) and before it in odd ones (`peer, cowherd`).
//!
//! So with 5 peers a round is `p1 C p2 p3 C p4 C p5`, the next `p2 C p3 p4 C p5 p1 C`, …: each
//! peer is paired with the cowherd run adjacent to it, and from round to round it moves from
//! one side of cowherd to the other, so no tool systematically runs after the heavy I/O of
//! another. Without a reference tool, each round runs the tools once, rotated by one place.

/// One tool run in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index of the tool in the tool list.
    pub tool: usize,
    /// For a peer: the position, in the same round, of the reference run it is paired with.
    pub pair: Option<usize>,
}

/// The slots of each of `rounds` rounds for `tools` tools, `reference` (if any) being the
/// tool every other one is paired with.
#[must_use]
pub fn schedule(tools: usize, reference: Option<usize>, rounds: usize) -> Vec<Vec<Slot>> {
    let reference = reference.filter(|&r| r < tools);
    let others: Vec<usize> = (0..tools).filter(|&t| Some(t) != reference).collect();
    (0..rounds)
        .map(|round| {
            let mut peers = others.clone();
            if !peers.is_empty() {
                let k = round % peers.len();
                peers.rotate_left(k);
            }
            let Some(r) = reference else {
                return peers
                    .into_iter()
                    .map(|tool| Slot { tool, pair: None })
                    .collect();
            };
            if peers.is_empty() {
                return vec![Slot {
                    tool: r,
                    pair: None,
                }];
            }
            let mut slots = Vec::new();
            for chunk in peers.chunks(2) {
                match *chunk {
                    [a, b] => {
                        let at = slots.len() + 1;
                        slots.push(Slot {
                            tool: a,
                            pair: Some(at),
                        });
                        slots.push(Slot {
                            tool: r,
                            pair: None,
                        });
                        slots.push(Slot {
                            tool: b,
                            pair: Some(at),
                        });
                    }
                    [a] if round % 2 == 0 => {
                        let at = slots.len();
                        slots.push(Slot {
                            tool: r,
                            pair: None,
                        });
                        slots.push(Slot {
                            tool: a,
                            pair: Some(at),
                        });
                    }
                    [a] => {
                        let at = slots.len() + 1;
                        slots.push(Slot {
                            tool: a,
                            pair: Some(at),
                        });
                        slots.push(Slot {
                            tool: r,
                            pair: None,
                        });
                    }
                    _ => unreachable!("chunks of two"),
                }
            }
            slots
        })
        .collect()
}

/// The slots of `schedule` as text, e.g. `hardlink, cowherd, rdfind`, for the report.
#[must_use]
pub fn describe(round: &[Slot], names: &[&str]) -> String {
    round
        .iter()
        .map(|s| names.get(s.tool).copied().unwrap_or("?"))
        .collect::<Vec<_>>()
        .join(", ")
}
