/* test_model.c -- handle unwrapping (the matrix of eplb-semantics) and MoE
 * shape validation. */
#include <criterion/criterion.h>
#include <string.h>

#include "eplb_model.h"

/* DeepSeek-V3-like MoE spec: 58 layers, 256 + 32 redundant, EP 32. */
static eplb_moe_spec dsv3(void) {
    return (eplb_moe_spec){ .num_moe_layers = 58, .num_logical_experts = 256,
                            .num_physical_experts = 288, .num_local_physical_experts = 9,
                            .num_routed_experts = 256, .num_shared_experts = 1,
                            .num_redundant_experts = 32, .num_expert_groups = 8 };
}

static eplb_handle moe_handle(const char *arch) {
    return (eplb_handle){ .architecture = arch, .interfaces = EPLB_IFACE_MOE, .has_moe = true, .moe = dsv3() };
}

static eplb_handle wrapper(const char *arch, const eplb_handle *inner) {
    return (eplb_handle){ .architecture = arch, .interfaces = EPLB_IFACE_MULTIMODAL, .language_model = inner };
}

Test(unwrap, moe_model_resolves_to_itself) {
    eplb_handle h = moe_handle("DeepseekV3ForCausalLM");
    eplb_resolved r;
    cr_assert_eq(eplb_handle_resolve(&h, "model", &r, NULL), EPLB_OK);
    cr_assert_eq(r.moe, &h);
    cr_assert_str_eq(r.path, "DeepseekV3ForCausalLM");
    cr_assert_str_eq(r.field, "model");
}

Test(unwrap, moe_vlm_wrapper_resolves_to_language_model) {
    eplb_handle lm = moe_handle("DeepseekV3ForCausalLM");
    eplb_handle vlm = wrapper("KimiK25ForConditionalGeneration", &lm);
    eplb_resolved r;
    cr_assert_eq(eplb_handle_resolve(&vlm, "model", &r, NULL), EPLB_OK);
    cr_assert_eq(r.moe, &lm);
    cr_assert_str_eq(r.path, "KimiK25ForConditionalGeneration.language_model");
    cr_assert_str_eq(r.field, "model.language_model");
}

Test(unwrap, moe_wrapper_that_is_itself_moe_is_not_unwrapped) {
    /* vLLM's rule: only a wrapper that is NOT MoE is unwrapped. */
    eplb_handle lm = moe_handle("Inner");
    eplb_handle vlm = moe_handle("Qwen3VLMoeForConditionalGeneration");
    vlm.interfaces |= EPLB_IFACE_MULTIMODAL;
    vlm.language_model = &lm;
    eplb_resolved r;
    cr_assert_eq(eplb_handle_resolve(&vlm, "model", &r, NULL), EPLB_OK);
    cr_assert_eq(r.moe, &vlm);
    cr_assert_str_eq(r.path, "Qwen3VLMoeForConditionalGeneration");
}

Test(unwrap, non_moe_vlm_is_not_registered_with_reason) {
    eplb_handle lm = { .architecture = "LlamaForCausalLM" };
    eplb_handle vlm = wrapper("LlavaForConditionalGeneration", &lm);
    eplb_resolved r;
    cr_assert_eq(eplb_handle_resolve(&vlm, "model", &r, NULL), EPLB_OK);
    cr_assert_null(r.moe);
    cr_assert_not_null(strstr(r.reason, "LlavaForConditionalGeneration.language_model"));
    cr_assert_not_null(strstr(r.reason, "not a Mixture-of-Experts"));
}

Test(unwrap, plain_non_moe_model_is_not_registered_with_reason) {
    eplb_handle h = { .architecture = "LlamaForCausalLM" };
    eplb_resolved r;
    cr_assert_eq(eplb_handle_resolve(&h, "model", &r, NULL), EPLB_OK);
    cr_assert_null(r.moe);
    cr_assert_not_null(strstr(r.reason, "LlamaForCausalLM"));
}

Test(unwrap, multimodal_without_language_model) {
    eplb_handle vlm = wrapper("SomeVLM", NULL);
    eplb_resolved r;
    cr_assert_eq(eplb_handle_resolve(&vlm, "model", &r, NULL), EPLB_OK);
    cr_assert_null(r.moe);
    cr_assert_not_null(strstr(r.reason, "no language_model"));
}

Test(unwrap, nested_wrappers_resolve_recursively) {
    /* A drafter wrapping a VLM wrapping the MoE language model: vLLM stops
     * after one level; eplbd goes down to the MoE handle. */
    eplb_handle lm = moe_handle("DeepseekV3ForCausalLM");
    eplb_handle vlm = wrapper("KimiK25ForConditionalGeneration", &lm);
    eplb_handle drafter = wrapper("EagleKimiK25", &vlm);
    eplb_resolved r;
    cr_assert_eq(eplb_handle_resolve(&drafter, "model", &r, NULL), EPLB_OK);
    cr_assert_eq(r.moe, &lm);
    cr_assert_str_eq(r.path, "EagleKimiK25.language_model.language_model");
    cr_assert_str_eq(r.field, "model.language_model.language_model");
}

/* A chain of `wrappers` wrappers around an MoE handle. */
static eplb_status resolve_chain(int wrappers, eplb_resolved *r, eplb_error *err) {
    static eplb_handle chain[64];
    chain[wrappers] = moe_handle("Moe");
    for (int i = wrappers - 1; i >= 0; i--)
        chain[i] = wrapper("W", &chain[i + 1]);
    return eplb_handle_resolve(&chain[0], "model", r, err);
}

Test(unwrap, depth_limit_is_exact) {
    eplb_resolved r;
    eplb_error err;
    cr_assert_eq(resolve_chain(EPLB_HANDLE_MAX_DEPTH, &r, &err), EPLB_OK);
    cr_assert_not_null(r.moe);
    cr_assert_eq(resolve_chain(EPLB_HANDLE_MAX_DEPTH + 1, &r, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "more than 8 wrapper levels"), "%s", err.msg);
}

Test(unwrap, moe_declared_with_zero_layers_is_an_error) {
    eplb_handle h = moe_handle("Broken");
    h.moe.num_moe_layers = 0;
    eplb_resolved r;
    eplb_error err;
    cr_assert_eq(eplb_handle_resolve(&h, "model", &r, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "model.moe.num_moe_layers is 0"), "%s", err.msg);
}

Test(unwrap, moe_declared_without_metadata_is_an_error) {
    eplb_handle h = { .architecture = "Broken", .interfaces = EPLB_IFACE_MOE };
    eplb_resolved r;
    eplb_error err;
    cr_assert_eq(eplb_handle_resolve(&h, "model", &r, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "model.moe is not set"), "%s", err.msg);
}

Test(unwrap, wrapper_declaring_moe_with_zero_layers_still_unwraps) {
    eplb_handle lm = moe_handle("Inner");
    eplb_handle vlm = wrapper("Outer", &lm);
    vlm.interfaces |= EPLB_IFACE_MOE;
    vlm.has_moe = true; /* num_moe_layers 0: not MoE itself */
    eplb_resolved r;
    cr_assert_eq(eplb_handle_resolve(&vlm, "model", &r, NULL), EPLB_OK);
    cr_assert_eq(r.moe, &lm);
}

Test(unwrap, empty_architecture_names_the_field) {
    eplb_handle lm = moe_handle("");
    eplb_handle vlm = wrapper("Outer", &lm);
    eplb_resolved r;
    eplb_error err;
    cr_assert_eq(eplb_handle_resolve(&vlm, "model", &r, &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "model.language_model.architecture is empty");
    cr_assert_eq(eplb_handle_resolve(NULL, "model", &r, &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "model is required");
}

/* ---- shape validation ---------------------------------------------------- */

static const eplb_parallel par32 = { .enable_eplb = true, .ep_size = 32, .num_nodes = 4 };

Test(shape, deepseek_v3_is_valid_and_defaults_apply) {
    eplb_moe_spec m = dsv3();
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    eplb_model_shape s;
    cr_assert_eq(eplb_model_shape_make(&m, "model", &par32, &lim, &s, NULL), EPLB_OK);
    cr_assert_eq(s.num_layers, 58);
    cr_assert_eq(s.num_physical, 288);
    cr_assert_eq(s.num_local, 9);
    cr_assert_eq(s.num_groups, 8);
    cr_assert_eq(s.window_size, 1000);
    cr_assert_eq(s.step_interval, 3000);
    m.num_expert_groups = 0;
    eplb_parallel p = par32;
    p.num_nodes = 0;
    p.window_size = 10;
    p.step_interval = 20;
    cr_assert_eq(eplb_model_shape_make(&m, "model", &p, &lim, &s, NULL), EPLB_OK);
    cr_assert_eq(s.num_groups, 1);
    cr_assert_eq(s.num_nodes, 1);
    cr_assert_eq(s.window_size, 10);
    cr_assert_eq(s.step_interval, 20);
}

typedef struct shape_case {
    const char *what;
    eplb_moe_spec moe;
    eplb_parallel par;
    const char *expect; /* substring of the message */
} shape_case;

Test(shape, inconsistent_metadata_names_the_field) {
    eplb_moe_spec base = dsv3();
    shape_case cases[16];
    int n = 0;
    eplb_moe_spec m;
#define CASE(desc, mutate, parm, msg) \
    do { m = base; mutate; cases[n++] = (shape_case){ desc, m, parm, msg }; } while (0)
    CASE("zero layers", m.num_moe_layers = 0, par32, "model.language_model.moe.num_moe_layers must be > 0");
    CASE("zero logical", m.num_logical_experts = 0, par32, "moe.num_logical_experts must be > 0");
    CASE("zero physical", (m.num_physical_experts = 0), par32, "moe.num_physical_experts must be > 0");
    CASE("physical != logical + redundant", m.num_physical_experts = 320, par32,
         "moe.num_physical_experts 320 != num_logical_experts 256 + num_redundant_experts 32");
    CASE("routed != logical", m.num_routed_experts = 255, par32, "num_routed_experts 255 != num_logical_experts 256");
    CASE("physical % ep", (void)0, ((eplb_parallel){ .enable_eplb = true, .ep_size = 7 }),
         "num_physical_experts 288 is not a multiple of parallel.ep_size 7");
    CASE("local", m.num_local_physical_experts = 8, par32,
         "num_local_physical_experts 8 != num_physical_experts 288 / ep_size 32");
    CASE("groups", m.num_expert_groups = 7, par32, "num_logical_experts 256 is not a multiple of num_expert_groups 7");
    CASE("ep zero", (void)0, ((eplb_parallel){ .enable_eplb = true }), "parallel.ep_size must be >= 1");
    CASE("nodes", (void)0, ((eplb_parallel){ .enable_eplb = true, .ep_size = 32, .num_nodes = 3 }),
         "parallel.ep_size 32 is not a multiple of parallel.num_nodes 3");
    CASE("redundant mismatch", (void)0,
         ((eplb_parallel){ .enable_eplb = true, .ep_size = 32, .num_redundant_experts = 16 }),
         "parallel.num_redundant_experts 16 != model.language_model.moe.num_redundant_experts 32");
    CASE("layer limit", m.num_moe_layers = 2000, par32, "num_moe_layers 2000 exceeds the server limit 1024 (--max-layers)");
    CASE("expert limit", (m.num_logical_experts = 9000, m.num_physical_experts = 9032, m.num_routed_experts = 0), par32,
         "num_physical_experts 9032 exceeds the server limit 8192 (--max-experts)");
#undef CASE
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    for (int i = 0; i < n; i++) {
        eplb_model_shape s;
        eplb_error err;
        eplb_error_clear(&err);
        cr_assert_eq(eplb_model_shape_make(&cases[i].moe, "model.language_model", &cases[i].par, &lim, &s, &err),
                     EPLB_EINVAL, "%s: accepted", cases[i].what);
        cr_assert_not_null(strstr(err.msg, cases[i].expect), "%s: message '%s' lacks '%s'", cases[i].what,
                           err.msg, cases[i].expect);
    }
}

Test(shape, ep_size_limit) {
    eplb_moe_spec m = dsv3();
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    lim.max_ep_size = 16;
    eplb_model_shape s;
    eplb_error err;
    cr_assert_eq(eplb_model_shape_make(&m, "model", &par32, &lim, &s, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "--max-ep-size"));
}

Test(name, model_names) {
    eplb_error err;
    cr_assert_eq(eplb_model_name_check("deepseek-ai/DeepSeek-V3:main_1.0", "model_name", &err), EPLB_OK);
    cr_assert_eq(eplb_model_name_check("", "model_name", &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "model_name is empty");
    cr_assert_eq(eplb_model_name_check("a b", "model_name", &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "0x20 at offset 1"));
    char longname[EPLB_MODEL_NAME_MAX + 2];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    cr_assert_eq(eplb_model_name_check(longname, "model_name", &err), EPLB_EINVAL);
    longname[EPLB_MODEL_NAME_MAX] = '\0';
    cr_assert_eq(eplb_model_name_check(longname, "model_name", &err), EPLB_OK);
}
