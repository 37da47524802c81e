

seed-new-p&
DeepseekV3ForCausalLM
 8*08