"""The SPIQA classifier: ViT image encoder, BERT question encoder, paper embedding and a fusion head."""

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

PAPER_EMBEDDING_DIM = 64
FUSION_HIDDEN_DIM = 512
FUSION_DROPOUT = 0.2


def load_encoder(name_or_path, pretrained=True, attn_implementation="sdpa", config=None):
    """Load a transformers encoder by hub name or local directory, or build it from config.

    With pretrained=False the weights are random and config (a dict or a PretrainedConfig) decides
    the architecture, which is how predict.py rebuilds a trained model before loading its weights.
    """
    if pretrained:
        return AutoModel.from_pretrained(name_or_path, attn_implementation=attn_implementation)

    if config is None:
        config = AutoConfig.from_pretrained(name_or_path)
    elif isinstance(config, dict):
        config = dict(config)
        model_type = config.pop("model_type")
        config = AutoConfig.for_model(model_type, **config)
    return AutoModel.from_config(config, attn_implementation=attn_implementation)


def pooled_output(outputs):
    """Return an encoder's pooler output, or its first token's hidden state for checkpoints saved without a pooler."""
    if getattr(outputs, "pooler_output", None) is not None:
        return outputs.pooler_output
    return outputs.last_hidden_state[:, 0]


class FusionHead(nn.Module):
    """Two SiLU layers with dropout over the concatenated image, question and paper features."""

    def __init__(self, input_dim, num_classes, hidden_dim=FUSION_HIDDEN_DIM, dropout=FUSION_DROPOUT):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, features):
        return self.layers(features)


class SpiqaClassifier(nn.Module):
    """Classify a (figure, question, paper) triple into one of num_classes answers.

    The encoders' widths come from their configs, so any ViT-like and BERT-like checkpoint works.
    Pixel values may arrive as uint8 [B, 3, H, W] (normalised here with the image processor's mean
    and std) or as already normalised floats.
    """

    def __init__(
        self,
        vision_encoder,
        text_encoder,
        num_classes,
        num_papers,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        rescale_factor=1 / 255,
        paper_embedding_dim=PAPER_EMBEDDING_DIM,
        hidden_dim=FUSION_HIDDEN_DIM,
        dropout=FUSION_DROPOUT,
    ):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.paper_embedding = nn.Embedding(num_papers, paper_embedding_dim)

        fused_dim = vision_encoder.config.hidden_size + text_encoder.config.hidden_size + paper_embedding_dim
        self.head = FusionHead(fused_dim, num_classes, hidden_dim=hidden_dim, dropout=dropout)

        mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        # Folding rescale and normalisation into one scale and shift: (x * rescale - mean) / std.
        self.register_buffer("pixel_scale", rescale_factor / std, persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)

    @property
    def num_classes(self):
        return self.head.layers[-1].out_features

    def normalize_pixels(self, pixel_values):
        if pixel_values.dtype == torch.uint8:
            return pixel_values.float() * self.pixel_scale + self.pixel_shift
        return pixel_values

    def encode_image(self, pixel_values):
        """Return the vision encoder's pooled output, [B, vision hidden size]."""
        return pooled_output(self.vision_encoder(pixel_values=self.normalize_pixels(pixel_values)))

    def encode_question(self, input_ids, attention_mask, token_type_ids=None):
        """Return the text encoder's pooled output, [B, text hidden size]."""
        return pooled_output(
            self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        )

    def classify(self, image_features, question_features, paper_ids):
        """Return logits [B, num_classes] from encoder features and paper indices."""
        fused = torch.cat([image_features, question_features, self.paper_embedding(paper_ids)], dim=-1)
        return self.head(fused)

    def forward(
        self,
        paper_ids,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        image_features=None,
        question_features=None,
    ):
        """Return logits [B, num_classes]; precomputed features, when given, skip their encoder."""
        if image_features is None:
            image_features = self.encode_image(pixel_values)
        if question_features is None:
            question_features = self.encode_question(input_ids, attention_mask, token_type_ids)
        return self.classify(image_features, question_features, paper_ids)

    def freeze_encoders(self):
        for encoder in (self.vision_encoder, self.text_encoder):
            encoder.requires_grad_(False)
            encoder.eval()

    def optimizer_groups(self, weight_decay):
        """Return AdamW parameter groups: weight matrices and embeddings decay, biases and norm weights do not."""
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            if parameter.ndim < 2 or "LayerNorm" in name or "layernorm" in name:
                no_decay.append(parameter)
            else:
                decay.append(parameter)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def build_model(model_args, pretrained=True):
    """Build a SpiqaClassifier from the dict that run_config.json stores under "model".

    With pretrained=True the encoders load from model_args' vision_model and text_model; otherwise
    they are built from the stored encoder configs with random weights, ready for load_state_dict.
    """
    attn_implementation = model_args.get("attn_implementation", "sdpa")
    vision_encoder = load_encoder(
        model_args["vision_model"],
        pretrained=pretrained,
        attn_implementation=attn_implementation,
        config=None if pretrained else model_args["vision_config"],
    )
    text_encoder = load_encoder(
        model_args["text_model"],
        pretrained=pretrained,
        attn_implementation=attn_implementation,
        config=None if pretrained else model_args["text_config"],
    )
    image_settings = model_args["image_settings"]
    normalize = image_settings["do_normalize"]
    return SpiqaClassifier(
        vision_encoder,
        text_encoder,
        num_classes=model_args["num_classes"],
        num_papers=model_args["num_papers"],
        image_mean=image_settings["image_mean"] if normalize else (0.0, 0.0, 0.0),
        image_std=image_settings["image_std"] if normalize else (1.0, 1.0, 1.0),
        rescale_factor=image_settings["rescale_factor"] if image_settings["do_rescale"] else 1.0,
        paper_embedding_dim=model_args.get("paper_embedding_dim", PAPER_EMBEDDING_DIM),
        hidden_dim=model_args.get("hidden_dim", FUSION_HIDDEN_DIM),
        dropout=model_args.get("dropout", FUSION_DROPOUT),
    )
