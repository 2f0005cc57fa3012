"""Built-in explainer plugins: saliency methods for ``prism explain`` and the ``explain_faithfulness`` task."""
