"""The tasks table: how a sampled x becomes a request to the LLM (system prompt, message layout, response length).
A leaf module with no heavy imports, so that the command line can list the tasks before torch loads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    description: str
    system_prompt: str | None
    user_template: str  # "{x}" is replaced by the sampled input text
    max_response_tokens: int

    def messages(self, x: str) -> list[dict]:
        """Chat messages for chat APIs and instruct models with a chat template."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": self.user_template.format(x=x)}]

    def plain_prompt(self, x: str) -> str:
        """One string for base models without a chat template and for completions endpoints."""
        user = self.user_template.format(x=x)
        return f"{self.system_prompt}\n\n{user}" if self.system_prompt else user


# One row per task; add a row to add a task.
TASKS: dict[str, Task] = {
    "raw": Task(
        "x sent as the whole user message with no system prompt; the LLM continues or answers it.", None, "{x}", 32
    ),
    "assistant": Task("x as a user turn to a helpful assistant.", "You are a helpful assistant.", "{x}", 64),
    "creative": Task(
        "x as the opening of a piece of writing that the LLM continues.",
        "You are a creative writer. Continue the text you are given in the same style.",
        "Continue this text:\n\n{x}",
        64,
    ),
    "code": Task(
        "x as the beginning of a source file that the LLM completes.",
        "You are an expert programmer. Complete the code you are given. Reply with code only.",
        "Complete this code:\n\n{x}",
        64,
    ),
}
