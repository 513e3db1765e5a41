"""Agent training: multi-turn rollouts in which the model calls tools (loop), the tools and
environments it may call (tools), and tool calls read and tool results written in the model's
own chat format (parsing, chat_templates/)."""
