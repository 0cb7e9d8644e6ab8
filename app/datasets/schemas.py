"""Request and response bodies for files."""

from typing import Literal

from pydantic import BaseModel

from app.core.models import File


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
            created_at=int(row.created_at.timestamp()),
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool


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
                    "purpose": {"type": "string", "enum": ["fine-tune"], "default": "fine-tune"},
                },
            }
        }
    },
}


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
