

seed-dummy&
DeepseekV3ForCausalLM
 8*00