

seed-dense
LlamaForCausalLM*0