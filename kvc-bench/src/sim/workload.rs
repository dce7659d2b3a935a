//! Seeded workload generators, calibrated to published statistics.
//!
//! - ShareGPT-like chat: input mean 161 and output mean 338 tokens (the vLLM paper's ShareGPT
//!   figures), log-normal lengths, Poisson arrivals.
//! - QoS overload: a steady critical stream plus a best-effort surge.
//! - Finance: critical interactive questions against best-effort report generation.
//! - Shared prefix: many questions over a few long documents.
//! - Multi-turn: chat sessions whose every turn resends the conversation so far.

use kvc_core::{QosClass, SessionId, TenantId};

use super::rng::Rng;

/// One request of a workload.
#[derive(Clone, Debug, PartialEq)]
pub struct SimRequest {
    /// Arrival time in seconds (for a follow-up turn: the think time after its predecessor
    /// finished).
    pub arrival_s: f64,
    /// Tenant.
    pub tenant: TenantId,
    /// QoS class.
    pub qos: QosClass,
    /// Session, for multi-turn chat.
    pub session: Option<SessionId>,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Tokens to generate.
    pub max_new_tokens: u32,
    /// Index of the request this one follows (the previous turn of its session): it arrives
    /// `arrival_s` seconds after that one finishes, and its prompt continues that one's prompt
    /// and output.
    pub after: Option<usize>,
}

/// The token the simulated model generates at `pos` of a sequence with this `stream` id (a
/// session's id, or the request's index): deterministic, so later turns can quote it.
#[must_use]
pub fn generated_token(stream: u64, pos: u64) -> u32 {
    let mut z = stream
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(pos.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z ^= z >> 29;
    (z % 32_000) as u32
}

fn fresh_tokens(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.range(0, 32_000) as u32).collect()
}

fn clamp_len(x: f64, lo: u64, hi: u64) -> u64 {
    (x.round() as u64).clamp(lo, hi)
}

/// One Poisson stream of independent requests with log-normal lengths.
struct Stream {
    rate: f64,
    from_s: f64,
    to_s: f64,
    limit: usize,
    tenant: TenantId,
    qos: QosClass,
    /// Mean, shape and minimum of the prompt length.
    input: (f64, f64, u64),
    /// Mean, shape and minimum of the output length.
    output: (f64, f64, u64),
}

impl Stream {
    /// Appends the stream's requests (at most `limit`, arriving before `to_s`), prompt plus
    /// output capped at `max_len` (the prompt at half of it).
    fn generate(&self, rng: &mut Rng, max_len: u64, out: &mut Vec<SimRequest>) {
        if self.rate <= 0.0 {
            return;
        }
        let mut t = self.from_s;
        for _ in 0..self.limit {
            t += rng.exponential(1.0 / self.rate);
            if t >= self.to_s {
                break;
            }
            let input = clamp_len(
                rng.lognormal(self.input.0, self.input.1),
                self.input.2,
                max_len / 2,
            );
            let output = clamp_len(
                rng.lognormal(self.output.0, self.output.1),
                self.output.2,
                max_len - input,
            );
            out.push(SimRequest {
                arrival_s: t,
                tenant: self.tenant,
                qos: self.qos,
                session: None,
                prompt: fresh_tokens(rng, input as usize),
                max_new_tokens: output as u32,
                after: None,
            });
        }
    }
}

/// ShareGPT-like chat requests: `n` requests at `rate` per second, lengths capped so prompt
/// plus output fit in `max_len`.
#[must_use]
pub fn sharegpt(n: usize, rate: f64, max_len: u64, seed: u64) -> Vec<SimRequest> {
    let mut out = Vec::with_capacity(n);
    Stream {
        rate,
        from_s: 0.0,
        to_s: f64::INFINITY,
        limit: n,
        tenant: TenantId(0),
        qos: QosClass::STANDARD,
        input: (161.0, 1.0, 4),
        output: (338.0, 0.9, 1),
    }
    .generate(&mut Rng::new(seed), max_len, &mut out);
    out
}

/// A steady critical stream (tenant 1) over `duration_s`, plus a best-effort surge (tenant 2)
/// of `surge_rate` requests per second between `surge_from_s` and `surge_to_s`.
#[must_use]
pub fn qos_overload(
    critical_rate: f64,
    surge_rate: f64,
    duration_s: f64,
    (surge_from_s, surge_to_s): (f64, f64),
    max_len: u64,
    seed: u64,
) -> Vec<SimRequest> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let critical = Stream {
        rate: critical_rate,
        from_s: 0.0,
        to_s: duration_s,
        limit: usize::MAX,
        tenant: TenantId(1),
        qos: QosClass::CRITICAL,
        input: (400.0, 0.6, 16),
        output: (150.0, 0.6, 8),
    };
    let surge = Stream {
        rate: surge_rate,
        from_s: surge_from_s,
        to_s: surge_to_s,
        limit: usize::MAX,
        tenant: TenantId(2),
        qos: QosClass::BEST_EFFORT,
        input: (800.0, 0.8, 16),
        output: (400.0, 0.8, 8),
    };
    critical.generate(&mut rng, max_len, &mut out);
    surge.generate(&mut rng, max_len, &mut out);
    out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    out
}

/// The finance example: critical interactive requests (tenant 1: short questions, short
/// answers, a tight first-token budget) at `critical_rate` per second, against best-effort
/// report generation (tenant 2: long filings in, long reports out) at `report_rate` per second
/// from `reports_from_s` on, both until `duration_s`.
#[must_use]
pub fn finance(
    critical_rate: f64,
    report_rate: f64,
    duration_s: f64,
    reports_from_s: f64,
    max_len: u64,
    seed: u64,
) -> Vec<SimRequest> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    Stream {
        rate: critical_rate,
        from_s: 0.0,
        to_s: duration_s,
        limit: usize::MAX,
        tenant: TenantId(1),
        qos: QosClass::CRITICAL,
        input: (250.0, 0.5, 16),
        output: (60.0, 0.5, 4),
    }
    .generate(&mut rng, max_len, &mut out);
    Stream {
        rate: report_rate,
        from_s: reports_from_s,
        to_s: duration_s,
        limit: usize::MAX,
        tenant: TenantId(2),
        qos: QosClass::BEST_EFFORT,
        input: (2_500.0, 0.5, 256),
        output: (600.0, 0.5, 64),
    }
    .generate(&mut rng, max_len, &mut out);
    out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    out
}

/// `n` questions at `rate` per second over `docs` documents of `doc_len` tokens each: the
/// prompt is a document followed by a `question_len`-token question.
#[must_use]
pub fn shared_prefix(
    n: usize,
    rate: f64,
    docs: usize,
    doc_len: usize,
    question_len: usize,
    output: u32,
    seed: u64,
) -> Vec<SimRequest> {
    let mut rng = Rng::new(seed);
    let documents: Vec<Vec<u32>> = (0..docs.max(1))
        .map(|_| fresh_tokens(&mut rng, doc_len))
        .collect();
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            t += rng.exponential(1.0 / rate);
            let mut prompt = documents[rng.range(0, documents.len() as u64) as usize].clone();
            prompt.extend(fresh_tokens(&mut rng, question_len));
            SimRequest {
                arrival_s: t,
                tenant: TenantId(0),
                qos: QosClass::STANDARD,
                session: None,
                prompt,
                max_new_tokens: output,
                after: None,
            }
        })
        .collect()
}

/// `sessions` chats of `turns` turns; each turn sends the whole conversation so far plus a
/// new `message_len`-token message, and the next turn follows `think_s` seconds after the
/// answer. Sessions start at `rate` per second.
#[must_use]
pub fn multi_turn(
    sessions: usize,
    turns: usize,
    rate: f64,
    message_len: usize,
    output: u32,
    think_s: f64,
    seed: u64,
) -> Vec<SimRequest> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut t = 0.0;
    for s in 0..sessions {
        t += rng.exponential(1.0 / rate);
        let session = SessionId(s as u64);
        let mut context: Vec<u32> = Vec::new();
        for turn in 0..turns {
            if turn > 0 {
                // The previous answer, as the simulated model generated it.
                let start = context.len() as u64;
                context.extend(
                    (start..start + u64::from(output)).map(|p| generated_token(session.get(), p)),
                );
            }
            context.extend(fresh_tokens(&mut rng, message_len));
            out.push(SimRequest {
                arrival_s: if turn == 0 { t } else { think_s },
                tenant: TenantId(0),
                qos: QosClass::STANDARD,
                session: Some(session),
                prompt: context.clone(),
                max_new_tokens: output,
                after: (turn > 0).then(|| out.len() - 1),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharegpt_lengths_match_the_published_means() {
        let w = sharegpt(20_000, 10.0, 4096, 1);
        let mean_in = w.iter().map(|r| r.prompt.len() as f64).sum::<f64>() / w.len() as f64;
        let mean_out = w.iter().map(|r| f64::from(r.max_new_tokens)).sum::<f64>() / w.len() as f64;
        assert!((mean_in - 161.0).abs() < 10.0, "{mean_in}");
        assert!((mean_out - 338.0).abs() < 20.0, "{mean_out}");
        assert!(
            w.iter()
                .all(|r| r.prompt.len() as u64 + u64::from(r.max_new_tokens) <= 4096)
        );
        assert_eq!(w, sharegpt(20_000, 10.0, 4096, 1));
    }

    #[test]
    fn later_turns_extend_the_conversation() {
        let w = multi_turn(2, 3, 1.0, 10, 5, 2.0, 3);
        assert_eq!(w.len(), 6);
        assert_eq!(w[1].after, Some(0));
        assert!(w[1].prompt.starts_with(&w[0].prompt));
        assert_eq!(w[1].prompt.len(), 10 + 5 + 10);
        assert_eq!(w[1].prompt[10], generated_token(0, 10));
    }
}
