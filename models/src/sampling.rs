//! Token sampling: greedy by default (as the authors evaluate), or temperature
//! with top-k / top-p / min-p and a repetition penalty, in llama.cpp's order.

/// Sampling settings. The defaults are greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax, lowest id on ties)
    pub temperature: f32,
    /// 0 = off
    pub top_k: usize,
    /// 1 = off
    pub top_p: f32,
    /// 0 = off
    pub min_p: f32,
    /// 1 = off; logits of recently seen tokens are divided (if > 0) or multiplied by it
    pub repeat_penalty: f32,
    /// how many recent tokens the penalties look at
    pub repeat_last_n: usize,
    /// 0 = off; subtracted from the logit of every token among the recent ones
    /// (OpenAI's `presence_penalty`, over llama.cpp's window)
    pub presence_penalty: f32,
    /// 0 = off; subtracted once per occurrence among the recent tokens
    /// (OpenAI's `frequency_penalty`)
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Names the first setting outside its range.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!(
                "repeat penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        for (name, v) in [
            ("presence penalty", self.presence_penalty),
            ("frequency penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, reproducible.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Picks next tokens from logits; keeps its scratch between calls.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<(f32, u32)>,
}

/// Index of the largest value, the lowest index on ties (NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Sampler {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Sizes the scratch for `n_logits` candidates up front, so [`Sampler::sample`]
    /// never allocates (otherwise the first sampled token sizes it).
    pub fn reserve(&mut self, n_logits: usize) {
        let c = &mut self.candidates;
        c.reserve(n_logits.saturating_sub(c.len()));
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token. `history` holds the tokens so far (prompt and
    /// generated) for the repetition penalty; `logits` is modified in place.
    /// Allocates nothing once the scratch holds `logits.len()` candidates.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let penalised =
            p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        if penalised {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let recent = &history[start..];
            for (i, &t) in recent.iter().enumerate() {
                // each distinct token is penalised once
                if recent[..i].contains(&t) {
                    continue;
                }
                if let Some(l) = logits.get_mut(t as usize) {
                    if p.repeat_penalty != 1.0 {
                        *l = if *l > 0.0 {
                            *l / p.repeat_penalty
                        } else {
                            *l * p.repeat_penalty
                        };
                    }
                    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
                        let count = recent[i..].iter().filter(|&&u| u == t).count();
                        *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                    }
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (l, i as u32)),
        );
        if c.is_empty() {
            return 0;
        }
        let by_logit_desc =
            |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);
        // softmax at temperature 1 for the nucleus/min-p cuts, as llama.cpp does
        let max = c[0].0;
        let mut sum = 0.0f32;
        for e in c.iter_mut() {
            let w = (e.0 - max).exp();
            sum += w;
            e.0 = w; // unnormalised probabilities from here on
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.0 / sum;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = c[0].0 * p.min_p;
            c.retain(|e| e.0 >= floor);
        }
        // temperature on the survivors: w^(1/T) = exp((l - max) / T)
        let inv_t = 1.0 / p.temperature;
        let mut total = 0.0f32;
        for e in c.iter_mut() {
            e.0 = e.0.powf(inv_t);
            total += e.0;
        }
        let mut r = self.rng.next_f32() * total;
        for e in c.iter() {
            r -= e.0;
            if r < 0.0 {
                return e.1;
            }
        }
        c.last().map(|e| e.1).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn greedy_takes_the_lowest_id_of_a_tie() {
        let mut s = Sampler::new(params());
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, f32::NAN], &[]), 1);
    }

    #[test]
    fn repeat_penalty_applies_once_per_distinct_recent_token() {
        let p = SamplingParams {
            repeat_penalty: 2.0,
            ..params()
        };
        let mut s = Sampler::new(p);
        let mut logits = [4.0, -4.0, 3.0];
        s.sample(&mut logits, &[0, 0, 1]);
        assert_eq!(logits, [2.0, -8.0, 3.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_recent_occurrences() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repeat_last_n: 3,
            ..params()
        };
        let mut s = Sampler::new(p);
        let mut logits = [1.0, 1.0, 1.0, 1.0];
        // only the last 3 of the history count: 2, 2, 3
        s.sample(&mut logits, &[0, 2, 2, 3]);
        assert_eq!(logits, [1.0, 1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25]);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: -1.0,
            ..params()
        });
        // a negative presence penalty favours what was said
        assert_eq!(s.sample(&mut [1.0, 0.5], &[1]), 1);
    }

    #[test]
    fn penalties_out_of_range_are_named() {
        let p = SamplingParams {
            frequency_penalty: 2.5,
            ..params()
        };
        assert!(p.validate().unwrap_err().contains("frequency penalty"));
    }

    #[test]
    fn the_same_seed_samples_the_same_tokens() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..params()
        };
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.1).collect();
        let run = || {
            let mut s = Sampler::new(p.clone());
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
