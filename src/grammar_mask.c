/*
 * A grammar-masked draw in one native call.
 *
 * When the model's own pick breaks the grammar, the engine draws again among the tokens the
 * grammar allows. FirstByteIndex (sampler.py) narrows those down first: it asks the grammar
 * about the one-byte tokens (and, inside literals, the two-byte ones) and keeps only tokens
 * that start with an accepted prefix. Done from Python, the numpy and ctypes glue around the
 * few grammar calls cost more than the grammar itself (about 0.25 ms per draw with a
 * 131k-token vocabulary); here the glue is gone and only llama.cpp's grammar work is left.
 *
 * The caller passes llama.cpp's llama_sampler_apply as a function pointer, so this library
 * needs no link to libllama. The layouts below mirror llama.h's token data structures.
 */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
  int32_t id;
  float logit;
  float p;
} nr_token_data;

typedef struct {
  nr_token_data * data;
  size_t size;
  int64_t selected;
  bool sorted;
} nr_token_data_array;

typedef void (*nr_apply_fn)(void * sampler, nr_token_data_array * candidates);

/* FirstByteIndex's tables, as compressed rows: the tokens of row r are
 * items[start[r]:start[r + 1]]. Rows of by_byte, loose and pair_start are bytes (257 starts). */
typedef struct {
  const int32_t * probe_tokens; /* the one-byte token of each probed byte */
  const int32_t * probe_bytes;  /* that byte */
  int32_t n_probes;
  const int32_t * always;       /* tokens that are candidates whatever the grammar's state */
  int32_t n_always;
  const int32_t * by_byte_start;
  const int32_t * by_byte;      /* tokens by first byte */
  const int32_t * loose_start;
  const int32_t * loose;        /* tokens by first byte whose first two bytes are no token */
  const int32_t * pair_start;   /* by first byte: a range of pair indices */
  const int32_t * pair_probes;  /* by pair index: the two-byte token probed */
  const int32_t * member_start; /* by pair index (n_pairs + 1 starts) */
  const int32_t * members;      /* tokens starting with that pair's two bytes */
} nr_first_byte_index;

static int32_t append(int32_t * out, int32_t n, const int32_t * start, const int32_t * items,
                      int32_t row)
{
  for (int32_t i = start[row]; i < start[row + 1]; ++i) {
    out[n++] = items[i];
  }
  return n;
}

/* Runs the grammar over the first ``count`` tokens of ``work``: it sets a rejected one's logit
 * to -inf. */
static void probe(nr_apply_fn apply, void * grammar, nr_token_data * work, int32_t count)
{
  nr_token_data_array array = {work, (size_t) count, -1, false};
  apply(grammar, &array);
}

static bool kept(const nr_token_data * item)
{
  return !(isinf(item->logit) && item->logit < 0);
}

/*
 * Writes the ids of the tokens that may pass the grammar now into ``ids`` and returns their
 * number: the same tokens, in the same order, as FirstByteIndex.possible. ``work`` is
 * scratch; both hold at least n_vocab entries.
 */
int32_t nemotron_ros_grammar_candidates(nr_apply_fn apply, void * grammar,
                                        const nr_first_byte_index * index,
                                        int32_t pair_max_bytes, int32_t pair_min_tokens,
                                        nr_token_data * work, int32_t * ids)
{
  int32_t first[256];
  int32_t n_first = 0;
  int64_t first_tokens = 0;
  for (int32_t i = 0; i < index->n_probes; ++i) {
    work[i] = (nr_token_data) {index->probe_tokens[i], 0.0f, 0.0f};
  }
  probe(apply, grammar, work, index->n_probes);
  for (int32_t i = 0; i < index->n_probes; ++i) {
    if (kept(&work[i])) {
      int32_t byte = index->probe_bytes[i];
      first[n_first++] = byte;
      first_tokens += index->by_byte_start[byte + 1] - index->by_byte_start[byte];
    }
  }
  int32_t n = 0;
  for (int32_t i = 0; i < index->n_always; ++i) {
    ids[n++] = index->always[i];
  }
  if (n_first > pair_max_bytes || first_tokens <= pair_min_tokens) {
    for (int32_t f = 0; f < n_first; ++f) {
      n = append(ids, n, index->by_byte_start, index->by_byte, first[f]);
    }
    return n;
  }
  int32_t n_pairs = 0;
  for (int32_t f = 0; f < n_first; ++f) {
    n = append(ids, n, index->loose_start, index->loose, first[f]);
    for (int32_t p = index->pair_start[first[f]]; p < index->pair_start[first[f] + 1]; ++p) {
      work[n_pairs++] = (nr_token_data) {index->pair_probes[p], 0.0f, 0.0f};
    }
  }
  if (n_pairs == 0) {
    return n;
  }
  probe(apply, grammar, work, n_pairs);
  int32_t k = 0;
  for (int32_t f = 0; f < n_first; ++f) {
    for (int32_t p = index->pair_start[first[f]]; p < index->pair_start[first[f] + 1]; ++p) {
      if (kept(&work[k++])) {
        n = append(ids, n, index->member_start, index->members, p);
      }
    }
  }
  return n;
}

/*
 * The chain's pick among the grammar's tokens, from the last logits: the candidates (all
 * n_vocab tokens without an index), masked by the grammar, then the chain. Accepts nothing.
 * Returns -1 when the grammar leaves no token.
 */
int32_t nemotron_ros_masked_draw(nr_apply_fn apply, void * grammar, void * chain,
                                 const nr_first_byte_index * index, int32_t pair_max_bytes,
                                 int32_t pair_min_tokens, const float * logits, int32_t n_vocab,
                                 nr_token_data * work, int32_t * ids)
{
  int32_t n = n_vocab;
  if (index != NULL) {
    n = nemotron_ros_grammar_candidates(apply, grammar, index, pair_max_bytes, pair_min_tokens,
                                        work, ids);
    for (int32_t i = 0; i < n; ++i) {
      work[i] = (nr_token_data) {ids[i], logits[ids[i]], 0.0f};
    }
  } else {
    for (int32_t i = 0; i < n; ++i) {
      work[i] = (nr_token_data) {i, logits[i], 0.0f};
    }
  }
  nr_token_data_array array = {work, (size_t) n, -1, false};
  apply(grammar, &array);
  apply(chain, &array);
  if (array.selected < 0 || array.selected >= (int64_t) array.size) {
    return -1;
  }
  const nr_token_data * chosen = &array.data[array.selected];
  return kept(chosen) ? chosen->id : -1;
}
