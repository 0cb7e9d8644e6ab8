"""Request and response bodies for files."""

from typing import Literal

from pydantic import BaseModel, Field

from app.core.models import File

# Files uploaded before base models had their own tokenizers were counted with the built-ins' (SmolLM2's).
LEGACY_TOKENIZER_MODEL = "smollm2-135m-instruct"


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    purpose: str
    bytes: int
    sha256: str
    format: str
    n_examples: int
    n_tokens: int
    max_example_tokens: int
    has_tools: bool = Field(
        description="Whether its lines use tool calling (tools, tool calls or results): jobs on it need a base model "
        "with tool support"
    )
    tokenizer_model: str = Field(description="The base model whose tokenizer counted n_tokens and max_example_tokens")
    status: Literal["processed"] = "processed"
    created_at: int

    @classmethod
    def of(cls, row: File) -> "FileObject":
        return cls(
            id=row.id,
            filename=row.filename,
            purpose=row.purpose,
            bytes=row.bytes,
            sha256=row.sha256,
            format=row.format,
            n_examples=row.n_examples,
            n_tokens=row.n_tokens,
            max_example_tokens=row.max_example_tokens,
            has_tools=row.has_tools,
            tokenizer_model=row.tokenizer_model or LEGACY_TOKENIZER_MODEL,
            created_at=int(row.created_at.timestamp()),
        )


# The upload is read as a stream (after authentication), so FastAPI cannot infer its schema: declared here.
UPLOAD_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "additionalProperties": False,
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "A .jsonl file"},
                    "purpose": {"type": "string", "enum": ["fine-tune", "evals"], "default": "fine-tune"},
                    "base_model": {
                        "type": "string",
                        "maxLength": 64,
                        "description": "Whose tokenizer counts the tokens (default: the service's default model)",
                    },
                },
            }
        }
    },
}


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
