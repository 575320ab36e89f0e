/* lib/model.c: model weights in memory (apb/model.h): creation, loading from a Hugging Face
 * directory, saving back to one, and release.
 *
 * Storage. A model owns at most one fp32 arena (every tensor that had to be fused, widened or
 * realigned) plus the read-only mappings of the safetensors files it was loaded from; F32 tensors that
 * need no fusion and are 4-byte aligned in their file point straight into the mapping. The loader
 * resolves and checks every tensor first (presence, dtype, shape, with the file and tensor named in
 * the error), then sizes the arena once, checks it against the memory available, and fills it.
 * Fusion is plain concatenation, because both halves are row-major with the same row length:
 * wqkv = q_proj rows ++ k_proj rows ++ v_proj rows (biases likewise), w_gate_up = gate ++ up.
 *
 * Sharded checkpoints: model.safetensors.index.json's weight_map names a shard per tensor. Every
 * shard it names must open (a missing one is an error naming it), every entry must be found in the
 * shard it names, and shard names may not leave the directory. model.safetensors wins when both are
 * present, as in transformers.
 *
 * What it deliberately is not: no quantised formats, no .bin (pickle) checkpoints (convert them with
 * transformers first; tools/convert_heads.py handles retaining heads), no check that weights are
 * finite (a NaN in a checkpoint shows up in the first comparison). apb_model_save writes unsharded
 * files; a BF16 save converts into one buffer of half the fp32 size (16 GB for llama3-8b-shape).
 *
 * Tested in tests/check_model.c: every loader error, fused layout, save/load round trips (bitwise
 * for F32, bf16-rounded for BF16), shards, and layer by layer against transformers fixtures.
 */
#include <errno.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "apb/dtype.h"
#include "apb/model.h"
#include "apb/safetensors.h"

typedef struct model_priv {
  float *arena; /* owned fp32 storage, or NULL */
  size_t arena_floats;
  apb_st_file **files; /* mappings the model points into (weight files, heads file) */
  int n_files;
} model_priv;

/* ---------------------------------------------------------------- sizes and memory */

/* Bytes this process can still allocate without swapping or hitting its cgroup limit; -1 unknown. */
static int64_t mem_available(void) {
  int64_t avail = -1;
  FILE *fp = fopen("/proc/meminfo", "r");
  if (fp) {
    char line[256];
    long long kb;
    while (fgets(line, sizeof line, fp))
      if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1) {
        avail = (int64_t)kb * 1024;
        break;
      }
    fclose(fp);
  }
  if (avail < 0) {
    long pages = sysconf(_SC_AVPHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    if (pages > 0 && psz > 0) avail = (int64_t)pages * psz;
  }
  /* A container's memory limit (cgroup v2) may be lower than what the host has free. */
  fp = fopen("/sys/fs/cgroup/memory.max", "r");
  if (fp) {
    long long max = 0, cur = 0;
    int have_max = fscanf(fp, "%lld", &max) == 1; /* "max" (no limit) does not scan */
    fclose(fp);
    FILE *fc = fopen("/sys/fs/cgroup/memory.current", "r");
    if (have_max && fc && fscanf(fc, "%lld", &cur) == 1 && max > cur && (avail < 0 || max - cur < avail))
      avail = max - cur;
    if (fc) fclose(fc);
  }
  return avail;
}

/* Allocate n floats of owned storage, after checking that they fit in memory. what names the model. */
static apb_status arena_alloc(model_priv *p, size_t n, const char *what, apb_error *err) {
  if (n == 0) return APB_OK;
  double gb = (double)n * 4 / 1e9;
  int64_t avail = mem_available();
  if (avail >= 0 && (double)n * 4 > (double)avail)
    return apb_error_set(err, APB_ENOMEM, "%s: needs %.2f GB of fp32 weights but only %.2f GB of memory is available",
                         what, gb, (double)avail / 1e9);
  p->arena = malloc(n * sizeof(float));
  if (!p->arena) return apb_error_set(err, APB_ENOMEM, "%s: allocating %.2f GB of fp32 weights failed", what, gb);
  p->arena_floats = n;
  return APB_OK;
}

static int64_t qkv_rows(const apb_model_config *c) {
  return ((int64_t)c->n_heads + 2 * (int64_t)c->n_kv_heads) * c->head_dim;
}

/* An upper bound of layout()'s count (every bias included), in double: 1 when the int64 count of a
 * configuration with positive sizes cannot overflow (below 2^62), else 0. */
static int layout_fits(const apb_model_config *c, int I) {
  const double E = c->hidden, F = c->ffn, V = c->vocab, QD = (double)c->n_heads * c->head_dim;
  const double QKV = ((double)c->n_heads + 2.0 * c->n_kv_heads) * c->head_dim;
  const double per = 3 * E + QKV * E + QKV + E * QD + E + 2 * F * E + 2 * F + E * F + E +
                     (I > 0 ? (double)I * QKV + (double)c->n_kv_heads * I : 0);
  return 2 * V * E + E + (double)c->n_layers * per < 0x1p62;
}

/* Walk every tensor of a model of configuration c in one fixed order, adding its size to the offset
 * and, when m is given, pointing its field at base + offset. Returns the total element count. */
static int64_t layout(const apb_model_config *c, int I, apb_model *m, float *base) {
  int64_t off = 0;
  const int64_t E = c->hidden, F = c->ffn, V = c->vocab, QKV = qkv_rows(c), QD = (int64_t)c->n_heads * c->head_dim;
  apb_model dm; /* stands in for m when only counting: its fields are never written */
  apb_model *t = m ? m : &dm;
#define TAKE(field, count)       \
  do {                           \
    if (m) (field) = base + off; \
    off += (count);              \
  } while (0)
  TAKE(t->embed, V * E);
  TAKE(t->final_norm, E);
  if (c->tie_embeddings) {
    if (m) m->lm_head = m->embed;
  } else {
    TAKE(t->lm_head, V * E);
  }
  for (int l = 0; l < c->n_layers; l++) {
    apb_layer dl, *y = m ? &m->layers[l] : &dl;
    memset(y, 0, sizeof *y);
    TAKE(y->attn_norm, E);
    TAKE(y->wqkv, QKV * E);
    if (c->qkv_bias) TAKE(y->bqkv, QKV);
    TAKE(y->wo, E * QD);
    if (c->o_bias) TAKE(y->bo, E);
    TAKE(y->ffn_norm, E);
    TAKE(y->w_gate_up, 2 * F * E);
    if (c->mlp_bias) TAKE(y->b_gate_up, 2 * F);
    TAKE(y->w_down, E * F);
    if (c->mlp_bias) TAKE(y->b_down, E);
    if (I > 0) {
      TAKE(y->fc1, (int64_t)I * QKV);
      TAKE(y->fc2, (int64_t)c->n_kv_heads * I);
    }
  }
#undef TAKE
  return off;
}

int64_t apb_model_param_count(const apb_model_config *cfg, int scorer_width) {
  if (!cfg) return 0;
  if (cfg->n_layers < 0 || cfg->hidden < 1 || cfg->ffn < 1 || cfg->n_heads < 1 || cfg->n_kv_heads < 1 ||
      cfg->head_dim < 1 || cfg->vocab < 1 || !layout_fits(cfg, scorer_width))
    return -1;
  return layout(cfg, scorer_width > 0 ? scorer_width : 0, NULL, NULL);
}

/* An empty model of configuration cfg: the struct, its layers and its private part. */
static apb_status model_shell(const apb_model_config *cfg, apb_model **out, apb_error *err) {
  apb_model *m = calloc(1, sizeof *m);
  model_priv *p = calloc(1, sizeof *p);
  apb_layer *layers = calloc(cfg->n_layers > 0 ? (size_t)cfg->n_layers : 1, sizeof *layers);
  if (!m || !p || !layers) {
    free(m), free(p), free(layers);
    return apb_error_set(err, APB_ENOMEM, "out of memory for a model of %d layers", cfg->n_layers);
  }
  m->cfg = *cfg;
  m->layers = layers;
  m->priv = p;
  *out = m;
  return APB_OK;
}

void apb_model_free(apb_model *m) {
  if (!m) return;
  model_priv *p = m->priv;
  if (p) {
    for (int i = 0; i < p->n_files; i++) apb_st_close(p->files[i]);
    free(p->files);
    free(p->arena);
    free(p);
  }
  free(m->layers);
  free(m);
}

apb_status apb_model_create(const apb_model_config *cfg, int scorer_width, apb_model **out, apb_error *err) {
  apb_error_clear(err);
  if (!cfg || !out) return apb_error_set(err, APB_EINVAL, "apb_model_create: NULL configuration or output");
  *out = NULL;
  if (cfg->n_layers < 1 || cfg->hidden < 1 || cfg->ffn < 1 || cfg->n_heads < 1 || cfg->n_kv_heads < 1 ||
      cfg->head_dim < 1 || cfg->vocab < 1 || scorer_width < 0 || cfg->n_heads % cfg->n_kv_heads != 0)
    return apb_error_set(err, APB_EINVAL,
                         "apb_model_create: invalid configuration (L %d, E %d, F %d, Hq %d, Hkv %d, D %d, V %d, "
                         "I %d)",
                         cfg->n_layers, cfg->hidden, cfg->ffn, cfg->n_heads, cfg->n_kv_heads, cfg->head_dim,
                         cfg->vocab, scorer_width);
  if (!layout_fits(cfg, scorer_width))
    return apb_error_set(err, APB_ENOMEM, "apb_model_create: %s has more than 2^62 parameters",
                         cfg->arch[0] ? cfg->arch : "the model");
  apb_model *m;
  apb_status st = model_shell(cfg, &m, err);
  if (st != APB_OK) return st;
  model_priv *p = m->priv;
  int64_t n = layout(cfg, scorer_width, NULL, NULL);
  if ((st = arena_alloc(p, (size_t)n, cfg->arch[0] ? cfg->arch : "model", err)) != APB_OK) {
    apb_model_free(m);
    return st;
  }
  layout(cfg, scorer_width, m, p->arena);
  m->scorer_width = scorer_width;
  *out = m;
  return APB_OK;
}

/* ---------------------------------------------------------------- loading */

/* One source tensor of a slot. */
typedef struct src {
  const apb_st_file *f;
  const apb_st_tensor *t;
} src;

/* A model field and the tensors concatenated into it (1, or 2-3 when fused). */
typedef struct slot {
  const float **dst;
  int n;
  src s[3];
  int64_t numel;
  int in_place;
} slot;

typedef struct loader {
  const char *dir;
  apb_error *err;
  apb_model *m;
  model_priv *p;
  apb_st_file *single; /* model.safetensors, or NULL when sharded */
  json_t *index;       /* the index document (sharded) */
  const json_t *weight_map;
  char *index_path;
  const char **shard_names; /* [n_shards], pointing into index */
  apb_st_file **shards;     /* [n_shards] (owned by p->files once opened) */
  int n_shards;
  apb_st_file *heads;
  slot *slots;
  int n_slots, cap_slots;
} loader;

static char *join(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *s = malloc(n);
  if (s) snprintf(s, n, "%s/%s", dir, name);
  return s;
}

static int file_exists(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0;
}

/* Keep f open for the lifetime of the model. */
static apb_status keep_file(loader *ld, apb_st_file *f) {
  model_priv *p = ld->p;
  apb_st_file **nf = realloc(p->files, (size_t)(p->n_files + 1) * sizeof *nf);
  if (!nf) {
    apb_st_close(f);
    return apb_error_set(ld->err, APB_ENOMEM, "%s: out of memory", ld->dir);
  }
  p->files = nf;
  p->files[p->n_files++] = f;
  return APB_OK;
}

static apb_status open_index(loader *ld) {
  apb_error *err = ld->err;
  json_error_t je;
  json_t *root = json_load_file(ld->index_path, JSON_REJECT_DUPLICATES, &je);
  if (!root)
    return apb_error_set(err, file_exists(ld->index_path) ? APB_EFORMAT : APB_EIO, "%s: not valid JSON: %s (line %d)",
                         ld->index_path, je.text, je.line);
  ld->index = root;
  const json_t *wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
  if (!wm) return apb_error_set(err, APB_EFORMAT, "%s: no \"weight_map\" object", ld->index_path);
  if (!json_is_object(wm))
    return apb_error_set(err, APB_EFORMAT, "%s: \"weight_map\" is not an object", ld->index_path);
  ld->weight_map = wm;
  size_t n = json_object_size(wm);
  ld->shard_names = calloc(n ? n : 1, sizeof *ld->shard_names);
  ld->shards = calloc(n ? n : 1, sizeof *ld->shards);
  if (!ld->shard_names || !ld->shards) return apb_error_set(err, APB_ENOMEM, "%s: out of memory", ld->index_path);
  const char *name;
  const json_t *v;
  json_object_foreach((json_t *)wm, name, v) {
    if (!json_is_string(v))
      return apb_error_set(err, APB_EFORMAT, "%s: weight_map[\"%.120s\"] is not a string (a shard file name)",
                           ld->index_path, name);
    const char *sh = json_string_value(v);
    if (!*sh || strchr(sh, '/') || strcmp(sh, ".") == 0 || strcmp(sh, "..") == 0)
      return apb_error_set(err, APB_EFORMAT,
                           "%s: weight_map[\"%.120s\"] names shard \"%.120s\"; expected a file name in the same "
                           "directory",
                           ld->index_path, name, sh);
    int k = 0;
    while (k < ld->n_shards && strcmp(ld->shard_names[k], sh) != 0) k++;
    if (k < ld->n_shards) continue;
    ld->shard_names[k] = sh;
    char *path = join(ld->dir, sh);
    if (!path) return apb_error_set(err, APB_ENOMEM, "%s: out of memory", ld->index_path);
    if (!file_exists(path)) {
      apb_status st = apb_error_set(err, APB_ENOTFOUND,
                                    "%s: shard \"%.120s\" (named in weight_map for \"%.120s\") does not exist: %s",
                                    ld->index_path, sh, name, path);
      free(path);
      return st;
    }
    apb_st_file *f = NULL;
    apb_status st = apb_st_open(path, &f, err);
    free(path);
    if (st != APB_OK)
      return apb_error_set(err, st, "%s: shard \"%.120s\" (named in weight_map for \"%.120s\")", ld->index_path, sh,
                           name);
    if ((st = keep_file(ld, f)) != APB_OK) return st;
    ld->shards[k] = f;
    ld->n_shards++;
  }
  /* Every entry must be where the index says. */
  json_object_foreach((json_t *)wm, name, v) {
    const char *sh = json_string_value(v);
    int k = 0;
    while (strcmp(ld->shard_names[k], sh) != 0) k++;
    if (!apb_st_find(ld->shards[k], name))
      return apb_error_set(err, APB_EFORMAT,
                           "%s: weight_map puts tensor '%.120s' in shard \"%.120s\", which has no such tensor",
                           ld->index_path, name, sh);
  }
  return APB_OK;
}

static apb_status open_weights(loader *ld) {
  char *single = join(ld->dir, "model.safetensors");
  ld->index_path = join(ld->dir, "model.safetensors.index.json");
  if (!single || !ld->index_path) {
    free(single);
    return apb_error_set(ld->err, APB_ENOMEM, "%s: out of memory", ld->dir);
  }
  apb_status st;
  if (file_exists(single) || !file_exists(ld->index_path)) {
    if (!file_exists(single)) {
      st = apb_error_set(ld->err, APB_ENOTFOUND,
                         "%s: no model.safetensors and no model.safetensors.index.json (a Hugging Face model "
                         "directory saved with safetensors is expected)",
                         ld->dir);
    } else if ((st = apb_st_open(single, &ld->single, ld->err)) == APB_OK) {
      st = keep_file(ld, ld->single);
    }
    free(single);
    return st;
  }
  free(single);
  return open_index(ld);
}

/* Find a weight by name with the given shape; errors name the file and the tensor. */
static apb_status find_weight(loader *ld, const char *name, int ndim, const int64_t *dims, src *out) {
  const apb_st_file *f = ld->single;
  if (!f) {
    const json_t *v = json_object_get(ld->weight_map, name);
    if (!v)
      return apb_error_set(ld->err, APB_ENOTFOUND, "%s: weight_map has no tensor '%.120s'", ld->index_path, name);
    int k = 0;
    while (strcmp(ld->shard_names[k], json_string_value(v)) != 0) k++;
    f = ld->shards[k];
  }
  out->f = f;
  return apb_st_get(f, name, ndim, dims, 0, &out->t, ld->err);
}

static apb_status add_slot(loader *ld, const float **dst, int n, const src *s) {
  if (ld->n_slots == ld->cap_slots) {
    int nc = ld->cap_slots ? 2 * ld->cap_slots : 64;
    slot *ns = realloc(ld->slots, (size_t)nc * sizeof *ns);
    if (!ns) return apb_error_set(ld->err, APB_ENOMEM, "%s: out of memory", ld->dir);
    ld->slots = ns, ld->cap_slots = nc;
  }
  slot *sl = &ld->slots[ld->n_slots++];
  memset(sl, 0, sizeof *sl);
  sl->dst = dst;
  sl->n = n;
  for (int i = 0; i < n; i++) {
    sl->s[i] = s[i];
    sl->numel += apb_st_numel(s[i].t);
  }
  sl->in_place = n == 1 && s[0].t->dtype == APB_DT_F32 && (uintptr_t)s[0].t->data % sizeof(float) == 0;
  return APB_OK;
}

/* One tensor (rank 1 or 2: d1 < 0 means rank 1) into one field. */
static apb_status want1(loader *ld, const float **dst, const char *name, int64_t d0, int64_t d1) {
  int64_t dims[2] = {d0, d1};
  src s;
  apb_status st = find_weight(ld, name, d1 < 0 ? 1 : 2, dims, &s);
  return st != APB_OK ? st : add_slot(ld, dst, 1, &s);
}

/* Layer l's weights. qkv: q, k, v fused; gate_up: gate, up fused. */
static apb_status want_layer(loader *ld, int l) {
  const apb_model_config *c = &ld->m->cfg;
  apb_layer *y = &ld->m->layers[l];
  const int64_t E = c->hidden, F = c->ffn, QD = (int64_t)c->n_heads * c->head_dim,
                KD = (int64_t)c->n_kv_heads * c->head_dim;
  char name[3][160];
  src s[3];
  apb_status st;
#define NAME(i, fmt) snprintf(name[i], sizeof name[i], "model.layers.%d." fmt, l)
  NAME(0, "input_layernorm.weight");
  if ((st = want1(ld, &y->attn_norm, name[0], E, -1)) != APB_OK) return st;
  static const char *const qkv[3] = {"q_proj", "k_proj", "v_proj"};
  const int64_t qkv_rows_[3] = {QD, KD, KD};
  for (int i = 0; i < 3; i++) {
    snprintf(name[i], sizeof name[i], "model.layers.%d.self_attn.%s.weight", l, qkv[i]);
    int64_t dims[2] = {qkv_rows_[i], E};
    if ((st = find_weight(ld, name[i], 2, dims, &s[i])) != APB_OK) return st;
  }
  if ((st = add_slot(ld, &y->wqkv, 3, s)) != APB_OK) return st;
  if (c->qkv_bias) {
    for (int i = 0; i < 3; i++) {
      snprintf(name[i], sizeof name[i], "model.layers.%d.self_attn.%s.bias", l, qkv[i]);
      if ((st = find_weight(ld, name[i], 1, &qkv_rows_[i], &s[i])) != APB_OK) return st;
    }
    if ((st = add_slot(ld, &y->bqkv, 3, s)) != APB_OK) return st;
  }
  NAME(0, "self_attn.o_proj.weight");
  if ((st = want1(ld, &y->wo, name[0], E, QD)) != APB_OK) return st;
  if (c->o_bias) {
    NAME(0, "self_attn.o_proj.bias");
    if ((st = want1(ld, &y->bo, name[0], E, -1)) != APB_OK) return st;
  }
  NAME(0, "post_attention_layernorm.weight");
  if ((st = want1(ld, &y->ffn_norm, name[0], E, -1)) != APB_OK) return st;
  int64_t gdims[2] = {F, E};
  NAME(0, "mlp.gate_proj.weight");
  NAME(1, "mlp.up_proj.weight");
  for (int i = 0; i < 2; i++)
    if ((st = find_weight(ld, name[i], 2, gdims, &s[i])) != APB_OK) return st;
  if ((st = add_slot(ld, &y->w_gate_up, 2, s)) != APB_OK) return st;
  if (c->mlp_bias) {
    NAME(0, "mlp.gate_proj.bias");
    NAME(1, "mlp.up_proj.bias");
    for (int i = 0; i < 2; i++)
      if ((st = find_weight(ld, name[i], 1, &F, &s[i])) != APB_OK) return st;
    if ((st = add_slot(ld, &y->b_gate_up, 2, s)) != APB_OK) return st;
  }
  NAME(0, "mlp.down_proj.weight");
  if ((st = want1(ld, &y->w_down, name[0], E, F)) != APB_OK) return st;
  if (c->mlp_bias) {
    NAME(0, "mlp.down_proj.bias");
    if ((st = want1(ld, &y->b_down, name[0], E, -1)) != APB_OK) return st;
  }
#undef NAME
  return APB_OK;
}

/* Retaining heads: fc1 [I, (Hq+2Hkv)D] and fc2 [Hkv, I] for every layer, I taken from layer 0. */
static apb_status want_heads(loader *ld, const char *path) {
  apb_status st = apb_st_open(path, &ld->heads, ld->err);
  if (st != APB_OK) return apb_error_set(ld->err, st, "retaining heads");
  if ((st = keep_file(ld, ld->heads)) != APB_OK) return st;
  const apb_model_config *c = &ld->m->cfg;
  const int64_t QKV = qkv_rows(c);
  char name[160];
  for (int l = 0; l < c->n_layers; l++) {
    apb_layer *y = &ld->m->layers[l];
    src s = {ld->heads, NULL};
    int64_t d1[2] = {l == 0 ? -1 : ld->m->scorer_width, QKV};
    snprintf(name, sizeof name, "model.layers.%d.self_attn.fc1.weight", l);
    if ((st = apb_st_get(ld->heads, name, 2, d1, 0, &s.t, ld->err)) != APB_OK) return st;
    if (l == 0) {
      if (s.t->shape[0] < 1 || s.t->shape[0] > (1 << 20))
        return apb_error_set(ld->err, APB_EFORMAT, "%s: tensor '%s' has %lld rows; expected a width in [1, %d]", path,
                             name, (long long)s.t->shape[0], 1 << 20);
      ld->m->scorer_width = (int)s.t->shape[0];
    }
    if ((st = add_slot(ld, &y->fc1, 1, &s)) != APB_OK) return st;
    int64_t d2[2] = {c->n_kv_heads, ld->m->scorer_width};
    snprintf(name, sizeof name, "model.layers.%d.self_attn.fc2.weight", l);
    if ((st = apb_st_get(ld->heads, name, 2, d2, 0, &s.t, ld->err)) != APB_OK) return st;
    if ((st = add_slot(ld, &y->fc2, 1, &s)) != APB_OK) return st;
  }
  return APB_OK;
}

/* Point in-place slots into their mappings, widen the rest into one arena. */
static apb_status fill(loader *ld) {
  size_t owned = 0;
  for (int i = 0; i < ld->n_slots; i++)
    if (!ld->slots[i].in_place) owned += (size_t)ld->slots[i].numel;
  apb_status st = arena_alloc(ld->p, owned, ld->dir, ld->err);
  if (st != APB_OK) return st;
  size_t off = 0;
  for (int i = 0; i < ld->n_slots; i++) {
    slot *sl = &ld->slots[i];
    if (sl->in_place) {
      *sl->dst = sl->s[0].t->data;
      continue;
    }
    float *d = ld->p->arena + off;
    for (int k = 0; k < sl->n; k++) {
      if ((st = apb_st_read_f32(sl->s[k].f, sl->s[k].t, d, ld->err)) != APB_OK) return st;
      d += apb_st_numel(sl->s[k].t);
    }
    *sl->dst = ld->p->arena + off;
    off += (size_t)sl->numel;
  }
  return APB_OK;
}

apb_status apb_model_load(const char *dir, const char *heads_path, apb_model **out, apb_error *err) {
  apb_error_clear(err);
  if (!dir || !out) return apb_error_set(err, APB_EINVAL, "apb_model_load: NULL directory or output");
  *out = NULL;
  if (!*dir) return apb_error_set(err, APB_EINVAL, "the model directory is empty (\"\"); give the directory "
                                  "holding config.json");
  apb_model_config cfg;
  char *cfg_path = join(dir, "config.json");
  if (!cfg_path) return apb_error_set(err, APB_ENOMEM, "%s: out of memory", dir);
  apb_status st = apb_config_load(cfg_path, &cfg, err);
  free(cfg_path);
  if (st != APB_OK) return st;

  loader ld = {.dir = dir, .err = err};
  if ((st = model_shell(&cfg, &ld.m, err)) != APB_OK) return st;
  ld.p = ld.m->priv;
  const int64_t E = cfg.hidden, V = cfg.vocab;
  if ((st = open_weights(&ld)) != APB_OK) goto done;
  if ((st = want1(&ld, &ld.m->embed, "model.embed_tokens.weight", V, E)) != APB_OK) goto done;
  if ((st = want1(&ld, &ld.m->final_norm, "model.norm.weight", E, -1)) != APB_OK) goto done;
  if (!cfg.tie_embeddings && (st = want1(&ld, &ld.m->lm_head, "lm_head.weight", V, E)) != APB_OK) goto done;
  for (int l = 0; l < cfg.n_layers; l++)
    if ((st = want_layer(&ld, l)) != APB_OK) goto done;
  if (heads_path && (st = want_heads(&ld, heads_path)) != APB_OK) goto done;
  if ((st = fill(&ld)) != APB_OK) goto done;
  if (cfg.tie_embeddings) ld.m->lm_head = ld.m->embed;
done:
  free(ld.slots);
  free(ld.shard_names);
  free(ld.shards);
  free(ld.index_path);
  json_decref(ld.index);
  if (st != APB_OK) {
    apb_model_free(ld.m);
    return st;
  }
  *out = ld.m;
  return APB_OK;
}

/* ---------------------------------------------------------------- saving */

/* The entries of a safetensors file being built, with their names. */
typedef struct entries {
  apb_st_entry *e;
  char (*names)[160];
  int n, cap;
} entries;

static int add_entry(entries *es, const char *name, const float *data, int64_t d0, int64_t d1) {
  if (es->n == es->cap) {
    int nc = es->cap ? 2 * es->cap : 64;
    apb_st_entry *ne = realloc(es->e, (size_t)nc * sizeof *ne);
    if (!ne) return -1;
    es->e = ne;
    char(*nn)[160] = realloc(es->names, (size_t)nc * sizeof *nn);
    if (!nn) return -1;
    es->names = nn;
    es->cap = nc;
  }
  snprintf(es->names[es->n], sizeof es->names[es->n], "%s", name);
  apb_st_entry *e = &es->e[es->n++];
  memset(e, 0, sizeof *e);
  e->dtype = APB_DT_F32;
  e->ndim = d1 < 0 ? 1 : 2;
  e->shape[0] = d0;
  e->shape[1] = d1 < 0 ? 0 : d1;
  e->data = data;
  return 0;
}

/* Names are stored apart so that the array can grow; point the entries at them before writing. */
static void bind_names(entries *es) {
  for (int i = 0; i < es->n; i++) es->e[i].name = es->names[i];
}

static size_t entry_numel(const apb_st_entry *e) {
  size_t n = 1;
  for (int i = 0; i < e->ndim; i++) n *= (size_t)e->shape[i];
  return n;
}

/* Write es to path in F32 or BF16 (converted through one buffer). */
static apb_status write_entries(entries *es, const char *path, int bf16, apb_error *err) {
  bind_names(es);
  static const char *const mk[] = {"format"}, *const mv[] = {"pt"};
  if (!bf16) return apb_st_write(path, es->n, es->e, 1, mk, mv, err);
  size_t total = 0;
  for (int i = 0; i < es->n; i++) total += entry_numel(&es->e[i]);
  uint16_t *buf = malloc(total ? total * sizeof *buf : 1);
  if (!buf)
    return apb_error_set(err, APB_ENOMEM, "%s: out of memory converting %.2f GB of weights to BF16", path,
                         (double)total * 2 / 1e9);
  size_t off = 0;
  for (int i = 0; i < es->n; i++) {
    apb_st_entry *e = &es->e[i];
    size_t n = entry_numel(e);
    apb_from_f32(buf + off, APB_DT_BF16, e->data, n);
    e->data = buf + off;
    e->dtype = APB_DT_BF16;
    off += n;
  }
  apb_status st = apb_st_write(path, es->n, es->e, 1, mk, mv, err);
  free(buf);
  return st;
}

static json_t *config_json(const apb_model_config *c, int bf16) {
  int qwen = strcmp(c->arch, "Qwen2ForCausalLM") == 0;
  json_t *o = json_object();
  if (!o) return NULL;
  int bad = 0;
#define SET(k, v) bad |= json_object_set_new(o, (k), (v)) != 0
  SET("architectures", json_pack("[s]", c->arch));
  SET("model_type", json_string(qwen ? "qwen2" : "llama"));
  SET("hidden_size", json_integer(c->hidden));
  SET("intermediate_size", json_integer(c->ffn));
  SET("num_hidden_layers", json_integer(c->n_layers));
  SET("num_attention_heads", json_integer(c->n_heads));
  SET("num_key_value_heads", json_integer(c->n_kv_heads));
  SET("head_dim", json_integer(c->head_dim));
  SET("hidden_act", json_string("silu"));
  SET("rms_norm_eps", json_real(c->rms_eps));
  SET("vocab_size", json_integer(c->vocab));
  SET("max_position_embeddings", json_integer(c->max_pos > 0 ? c->max_pos : 2048));
  SET("tie_word_embeddings", json_boolean(c->tie_embeddings));
  if (qwen) {
    SET("use_sliding_window", json_false());
  } else {
    SET("attention_bias", json_boolean(c->qkv_bias));
    SET("mlp_bias", json_boolean(c->mlp_bias));
  }
  SET("rope_theta", json_real(c->rope.theta));
  switch (c->rope.type) {
  case APB_ROPE_DEFAULT: SET("rope_scaling", json_null()); break;
  case APB_ROPE_LINEAR:
    SET("rope_scaling", json_pack("{s:s, s:f}", "rope_type", "linear", "factor", c->rope.factor));
    break;
  case APB_ROPE_LLAMA3:
    SET("rope_scaling",
        json_pack("{s:s, s:f, s:f, s:f, s:I}", "rope_type", "llama3", "factor", c->rope.factor, "low_freq_factor",
                  c->rope.low_freq_factor, "high_freq_factor", c->rope.high_freq_factor,
                  "original_max_position_embeddings", (json_int_t)c->rope.original_max_pos));
    break;
  }
  SET("torch_dtype", json_string(bf16 ? "bfloat16" : "float32"));
#undef SET
  if (bad) {
    json_decref(o);
    return NULL;
  }
  return o;
}

static apb_status write_config(const apb_model_config *c, const char *dir, int bf16, apb_error *err) {
  char *path = join(dir, "config.json"), *tmp = join(dir, ".config.json.tmp");
  json_t *o = config_json(c, bf16);
  apb_status st = APB_OK;
  if (!path || !tmp || !o) {
    st = apb_error_set(err, APB_ENOMEM, "%s: out of memory writing config.json", dir);
  } else if (json_dump_file(o, tmp, JSON_INDENT(2) | JSON_PRESERVE_ORDER) != 0) {
    st = apb_error_set(err, APB_EIO, "%s: cannot write %s: %s", dir, tmp, strerror(errno));
    unlink(tmp);
  } else if (rename(tmp, path) != 0) {
    st = apb_error_set(err, APB_EIO, "%s: cannot rename %s to %s: %s", dir, tmp, path, strerror(errno));
    unlink(tmp);
  }
  json_decref(o);
  free(path);
  free(tmp);
  return st;
}

/* A configuration that config.json can express (transformers would otherwise build another model). */
static apb_status check_saveable(const apb_model *m, apb_error *err) {
  const apb_model_config *c = &m->cfg;
  int qwen = strcmp(c->arch, "Qwen2ForCausalLM") == 0, llama = strcmp(c->arch, "LlamaForCausalLM") == 0;
  if (!qwen && !llama)
    return apb_error_set(err, APB_EUNSUPPORTED, "apb_model_save: architecture \"%.64s\" cannot be saved", c->arch);
  if (qwen && (!c->qkv_bias || c->o_bias || c->mlp_bias))
    return apb_error_set(err, APB_EINVAL,
                         "apb_model_save: Qwen2 has q/k/v biases and no o or MLP biases; this model has qkv %d o %d "
                         "mlp %d",
                         c->qkv_bias, c->o_bias, c->mlp_bias);
  if (llama && c->qkv_bias != c->o_bias)
    return apb_error_set(
        err, APB_EINVAL,
        "apb_model_save: Llama's attention_bias covers q, k, v and o together; this model has qkv %d "
        "o %d",
        c->qkv_bias, c->o_bias);
  return APB_OK;
}

apb_status apb_model_save(const apb_model *m, const char *dir, int bf16, apb_error *err) {
  apb_error_clear(err);
  if (!m || !dir) return apb_error_set(err, APB_EINVAL, "apb_model_save: NULL model or directory");
  apb_status st = check_saveable(m, err);
  if (st != APB_OK) return st;
  if (mkdir(dir, 0755) != 0 && errno != EEXIST)
    return apb_error_set(err, APB_EIO, "%s: cannot create the directory: %s", dir, strerror(errno));
  const apb_model_config *c = &m->cfg;
  const int64_t E = c->hidden, F = c->ffn, V = c->vocab, D = c->head_dim, QD = (int64_t)c->n_heads * D,
                KD = (int64_t)c->n_kv_heads * D;
  entries es = {0}, hs = {0};
  char *wpath = join(dir, "model.safetensors"), *hpath = join(dir, APB_HEADS_FILE);
  char name[160];
  int bad = !wpath || !hpath;
  bad |= add_entry(&es, "model.embed_tokens.weight", m->embed, V, E);
  bad |= add_entry(&es, "model.norm.weight", m->final_norm, E, -1);
  if (!c->tie_embeddings) bad |= add_entry(&es, "lm_head.weight", m->lm_head, V, E);
  int heads = m->scorer_width > 0;
  for (int l = 0; l < c->n_layers && !bad; l++) {
    const apb_layer *y = &m->layers[l];
    heads = heads && y->fc1 && y->fc2;
#define ADD(list, fmt, data, d0, d1)                        \
  do {                                                      \
    snprintf(name, sizeof name, "model.layers.%d." fmt, l); \
    bad |= add_entry((list), name, (data), (d0), (d1));     \
  } while (0)
    ADD(&es, "input_layernorm.weight", y->attn_norm, E, -1);
    ADD(&es, "self_attn.q_proj.weight", y->wqkv, QD, E);
    ADD(&es, "self_attn.k_proj.weight", y->wqkv + QD * E, KD, E);
    ADD(&es, "self_attn.v_proj.weight", y->wqkv + (QD + KD) * E, KD, E);
    if (c->qkv_bias) {
      ADD(&es, "self_attn.q_proj.bias", y->bqkv, QD, -1);
      ADD(&es, "self_attn.k_proj.bias", y->bqkv + QD, KD, -1);
      ADD(&es, "self_attn.v_proj.bias", y->bqkv + QD + KD, KD, -1);
    }
    ADD(&es, "self_attn.o_proj.weight", y->wo, E, QD);
    if (c->o_bias) ADD(&es, "self_attn.o_proj.bias", y->bo, E, -1);
    ADD(&es, "post_attention_layernorm.weight", y->ffn_norm, E, -1);
    ADD(&es, "mlp.gate_proj.weight", y->w_gate_up, F, E);
    ADD(&es, "mlp.up_proj.weight", y->w_gate_up + F * E, F, E);
    ADD(&es, "mlp.down_proj.weight", y->w_down, E, F);
    if (c->mlp_bias) {
      ADD(&es, "mlp.gate_proj.bias", y->b_gate_up, F, -1);
      ADD(&es, "mlp.up_proj.bias", y->b_gate_up + F, F, -1);
      ADD(&es, "mlp.down_proj.bias", y->b_down, E, -1);
    }
    if (y->fc1 && y->fc2 && m->scorer_width > 0) {
      ADD(&hs, "self_attn.fc1.weight", y->fc1, m->scorer_width, QD + 2 * KD);
      ADD(&hs, "self_attn.fc2.weight", y->fc2, c->n_kv_heads, m->scorer_width);
    }
#undef ADD
  }
  if (bad) {
    st = apb_error_set(err, APB_ENOMEM, "%s: out of memory listing the tensors", dir);
    goto done;
  }
  for (int i = 0; i < es.n; i++)
    if (!es.e[i].data) {
      st = apb_error_set(err, APB_EINVAL, "apb_model_save: tensor '%s' of the model is NULL", es.names[i]);
      goto done;
    }
  if ((st = write_config(c, dir, bf16, err)) != APB_OK) goto done;
  st = write_entries(&es, wpath, bf16, err);
  if (st == APB_OK && heads) st = write_entries(&hs, hpath, bf16, err);
  if (st != APB_OK) { /* this config with an earlier model's weights or heads would load as one model */
    char *cpath = join(dir, "config.json");
    if (cpath) unlink(cpath);
    free(cpath);
    unlink(wpath), unlink(hpath);
  }
done:
  free(es.e), free(es.names), free(hs.e), free(hs.names);
  free(wpath), free(hpath);
  return st;
}
