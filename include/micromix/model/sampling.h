// Next-token sampling from one position's logits: greedy at temperature 0, else
// softmax(logits / T) cut to the smallest set of the most likely tokens whose probability
// reaches top_p (nucleus sampling), one draw from rng. NaN or infinite logits are refused
// (std::invalid_argument).
#pragma once

#include <cstdint>
#include <random>
#include <span>

namespace micromix::model {

// Sorts only the tokens the nucleus can reach (those above a weight threshold that keeps
// enough mass): typically a few hundred of a 128k vocabulary instead of all of them.
int32_t sample_token(std::span<const float> logits, double temperature, double top_p, std::mt19937_64& rng);

// The same draw from a full sort of the vocabulary: the reference sample_token is held to
// (the same token for the same rng state).
int32_t sample_token_full_sort(std::span<const float> logits, double temperature, double top_p, std::mt19937_64& rng);

// exp(x) for x <= 0 in fp32 (within 2 ulp; 0 below -87), the sampling weights' exponential:
// branch-free, so that the vocabulary's weights are computed eight at a time.
float exp_nonpositive(float x);

}  // namespace micromix::model
