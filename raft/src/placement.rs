//! Where a result's copies go: rendezvous (highest random weight) hashing.
//!
//! Every node ranks the candidate nodes for a result the same way, from the
//! result's sha256 and the node ids alone: the executing node pushes copies
//! to the first ones, the leader's repair copies to the first ones missing,
//! and a reader tries holders in the same order. Why rendezvous hashing: no
//! ring or table to agree on, an even spread, and a node joining or leaving
//! moves only the results it ranks first for (about 1/n of them), so repair
//! after a change copies little.

use crate::job::NodeId;
use crate::result::ResultHash;

/// splitmix64's finaliser: a cheap, well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weight of `node` for `sha`. The sha256 is already uniform; mixing it
/// with the node id gives each (result, node) pair an independent weight.
pub fn weight(sha: &ResultHash, node: NodeId) -> u64 {
    let a = u64::from_le_bytes(sha.0[0..8].try_into().expect("8 bytes"));
    let b = u64::from_le_bytes(sha.0[8..16].try_into().expect("8 bytes"));
    mix(a ^ mix(node.wrapping_add(b)))
}

/// `candidates` ranked for `sha`, best first (ties, which need equal 64-bit
/// weights, go to the lower id). Duplicates are kept as given.
pub fn rank(sha: &ResultHash, candidates: impl IntoIterator<Item = NodeId>) -> Vec<NodeId> {
    let mut ranked: Vec<(u64, NodeId)> = candidates.into_iter().map(|n| (weight(sha, n), n)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(i: u32) -> ResultHash {
        ResultHash::of(&i.to_le_bytes())
    }

    #[test]
    fn the_ranking_is_a_deterministic_permutation() {
        for i in 0..100 {
            let r = rank(&sha(i), [5, 1, 9, 3]);
            assert_eq!(r, rank(&sha(i), [9, 3, 5, 1]), "order of the candidates does not matter");
            let mut sorted = r.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![1, 3, 5, 9]);
        }
    }

    #[test]
    fn first_choices_spread_evenly() {
        let nodes: Vec<NodeId> = (1..=10).collect();
        let mut first = [0u32; 11];
        let n = 20_000;
        for i in 0..n {
            first[rank(&sha(i), nodes.iter().copied())[0] as usize] += 1;
        }
        for (node, count) in first.iter().enumerate().skip(1) {
            // 2,000 expected; 5 standard deviations is about 210.
            assert!((1_790..=2_210).contains(count), "node {node} ranked first {count} times of {n}");
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_results() {
        let all: Vec<NodeId> = (1..=8).collect();
        let without: Vec<NodeId> = all.iter().copied().filter(|n| *n != 4).collect();
        let mut moved = 0;
        for i in 0..5_000 {
            let (a, b) = (rank(&sha(i), all.iter().copied()), rank(&sha(i), without.iter().copied()));
            // The relative order of the remaining nodes never changes.
            assert_eq!(a.iter().copied().filter(|n| *n != 4).collect::<Vec<_>>(), b);
            // The top 3 changes only where node 4 was in it.
            if a[..3] != b[..3] {
                assert!(a[..3].contains(&4));
                moved += 1;
            }
        }
        // About 3/8 of the results had node 4 in their top 3.
        assert!((1_600..=2_150).contains(&moved), "{moved} of 5000 moved");
    }
}
