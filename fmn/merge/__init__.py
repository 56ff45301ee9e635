"""Many patches into one model: closed-form fusion, erase anchors, the base model's judge."""
