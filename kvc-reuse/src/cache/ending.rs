//! [`PrefixCache::end_conversation`]: an application's word that a conversation has ended (the
//! user closed the chat, the session expired), so the blocks only that conversation used are
//! evicted before everything else, until something uses them again.
//!
//! This is a signal from outside the prompt stream, which no eviction policy can infer: on
//! the Mooncake conversation trace, knowing *which* blocks come back is worth most of the gap
//! between LRU and the offline optimum (see `docs/reuse.md`, "Ending a conversation").

use thiserror::Error;

use kvc_core::Retention;

use super::{NIL, PrefixCache};
use crate::BlockHash;

/// What [`PrefixCache::end_conversation`] did with a chain's blocks. Every hash given is
/// counted once: `keep_first` (at most the cached ones) + `demoted` + `kept` + `uncached` is
/// the number of hashes.
#[must_use]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConversationEnd {
    /// Blocks now evicted before every other block (until used again).
    pub demoted: usize,
    /// Cached blocks past `keep_first` left as they were because something else needs them:
    /// in use, with a cached child outside the chain that is not ended (another conversation
    /// branches there),
    /// carrying a retention set by [`PrefixCache::set_retention`], or above such a block.
    pub kept: usize,
    /// Hashes from the first one the cache does not hold (already evicted, or never cached).
    pub uncached: usize,
}

/// Why [`PrefixCache::end_conversation`] refused a chain. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EndError {
    /// Block `index` is cached, but not as the child of block `index - 1` (or, at index 0,
    /// not as a first block): the hashes are not one chain from a prompt's first block, as
    /// [`BlockHasher::hash_blocks`](crate::BlockHasher::hash_blocks) produces them.
    #[error(
        "block {index} of the chain is cached, but not right after block {index} - 1 of it: pass a prompt's chained hashes from its first block"
    )]
    BrokenChain {
        /// The position in the hashes given.
        index: usize,
    },
}

impl PrefixCache {
    /// The retention [`end_conversation`](Self::end_conversation) gives the blocks it demotes:
    /// the lowest priority, no expiry. It lasts until the block is used again (a lookup hit,
    /// an insert offering it, an [`acquire`](Self::acquire)), which restores the default;
    /// [`block_retention`](Self::block_retention) reports it meanwhile.
    pub const ENDED: Retention = Retention::fixed(0);

    /// Tells the cache the conversation whose latest prompt hashes to `hashes` (a whole chain
    /// from the first block, as passed to [`insert`](Self::insert)) has ended, so its own
    /// blocks are evicted first, least recently used first, before any block of default or
    /// higher retention, whatever the policy. Call it after the request released its blocks.
    ///
    /// Only the conversation's own tail is demoted. Walking from the last cached block back
    /// towards the first, the walk stops at the first block that
    /// - is among the first `keep_first` (blocks the application knows other conversations
    ///   share: a system prompt, a document; 0 if it knows of none),
    /// - is in use (another live request reads it),
    /// - has a cached child outside this chain (another conversation branches there) that has
    ///   not been ended itself, or
    /// - carries a retention set by [`set_retention`](Self::set_retention) (a pin wins);
    ///
    /// that block and every block before it keep their standing, since whatever needs them
    /// also needs their prefix. Eviction order among other blocks is unchanged, and a cache
    /// never told of an ending evicts exactly as before.
    ///
    /// An engine ending a multi-turn conversation ends each turn's prompt, oldest first: a
    /// turn's prompt hangs the tail it did not pass on (the reply's partial block, a prompt
    /// the next turn rewrote) beside the next turn's blocks, and once that tail is ended the
    /// next turn's walk goes past it.
    ///
    /// A demoted block used again gets the default retention back: the conversation went on
    /// after all, or another one reached the block, and it is ranked by the policy like any
    /// other. Ending a conversation twice, or one whose blocks are gone, is harmless.
    ///
    /// # Errors
    /// [`EndError::BrokenChain`] when the cached hashes are not one chain from the first
    /// block; nothing changes.
    pub fn end_conversation(
        &mut self,
        hashes: &[BlockHash],
        keep_first: usize,
        now_ms: u64,
    ) -> Result<ConversationEnd, EndError> {
        // The cached part of the chain (a prefix of it: eviction is leaf first), checked whole
        // before anything changes.
        let mut slots = std::mem::take(&mut self.hit_slots);
        slots.clear();
        let mut parent = NIL;
        let mut result = Ok(());
        for (index, &h) in hashes.iter().enumerate() {
            let Some(slot) = self.find(h) else { break };
            if self.nodes[slot as usize].parent != parent {
                result = Err(EndError::BrokenChain { index });
                break;
            }
            slots.push(slot);
            parent = slot;
        }
        let outcome = result.map(|()| {
            self.now_ms = now_ms;
            let cached = slots.len();
            let mut end = ConversationEnd {
                uncached: hashes.len() - cached,
                ..ConversationEnd::default()
            };
            let first = keep_first.min(cached);
            let mut i = cached;
            while i > first {
                i -= 1;
                let slot = slots[i];
                let next = slots.get(i + 1).copied().unwrap_or(NIL);
                if !self.own_block(slot, next) {
                    end.kept = i + 1 - first;
                    break;
                }
                self.retain(slot, Self::ENDED, true);
                end.demoted += 1;
            }
            end
        });
        self.hit_slots = slots;
        outcome
    }

    /// Whether the node at `slot` carries an ending's retention. Its descendants then do
    /// too: the walk demotes a block only after everything below it, and any later use of a
    /// block below it (a lookup or insert walks from the first block) restores it first.
    fn ended(&self, slot: u32) -> bool {
        self.nodes[slot as usize].retained && self.retained.get(&slot).is_some_and(|r| r.until_used)
    }

    /// Whether the node at `slot`, followed in the chain by the node at `next` ([`NIL`] at
    /// the chain's end), belongs to that chain alone: no holder, no other cached child but
    /// ended ones, no retention set by the caller (an earlier ending's may be renewed).
    fn own_block(&self, slot: u32, next: u32) -> bool {
        let node = &self.nodes[slot as usize];
        if node.refs > 0 {
            return false;
        }
        let mut child = node.first_child;
        while child != NIL {
            if child != next && !self.ended(child) {
                return false;
            }
            child = self.nodes[child as usize].next_sibling;
        }
        !node.retained
            || self.retained.get(&slot).is_none_or(|r| r.until_used)
            || self.retention(slot) == Retention::DEFAULT
    }
}
