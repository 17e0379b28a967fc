//! The channel rules: what makes a commit, a tree or a Welcome acceptable. One piece of code,
//! run by members ([`super::Channel`]) and by relays ([`super::PublicChannel`]) alike, so that
//! the two never disagree on a commit: a relay that certifies a commit the members refuse would
//! leave the channel stuck behind it, and a member that merges what a relay refused would fork.
//!
//! The rules, for a commit by `committer` on a channel whose current config is `config`:
//!
//! 1. **Proposal types.** Only Add, Remove and GroupContextExtensions, and only by value (ChitChat
//!    never sends proposals on their own, so there is nothing to refer to). Update, PreSharedKey,
//!    ReInit, ExternalInit, SelfRemove and custom proposals are refused.
//! 2. **Who.** Changing the config needs an admin (every member under
//!    [`AdminPolicy::AnyMember`]; under [`AdminPolicy::Users`] every device of an admin user).
//!    Adding and removing need an admin too, except that any member at a relay may add and
//!    remove devices of its own user (the user named by the credentials, [`UserId::Address`]):
//!    a user's new device follows the user into the channel, and a revoked one leaves it.
//!    Anyone may commit its own update (an update path and no proposal).
//! 3. **Leaves name their keys.** Every leaf's BasicCredential is the [`DeviceId`] whose key signs
//!    the leaf: an added KeyPackage's leaf, and the committer's new leaf, which must also keep the
//!    committer's device (a device that wants another key is removed and added).
//! 4. **Config changes.** A GroupContextExtensions proposal may change the name, the admin
//!    policy and the relay set. The MIME type and the creator stay, the config must stay valid, an
//!    admin set may not be empty, a relay set has 1 to 64 relays with distinct hosts and keys,
//!    every relay it adds passes the caller's [`CredentialCheck::check_relay`] (a relay known
//!    under that host with that key: it certifies from the next epoch on), and the group context
//!    carries nothing but the required-capabilities extension and the config. (The commit that
//!    changes the relay set is certified by the set it is built on, like every commit.)
//! 5. **Credentials.** Every credential the commit brings in passes the caller's
//!    [`CredentialCheck`] (the committer's unchanged credential was checked when it joined).
//!    All are checked before the first failure is returned, so that a checker that records
//!    unknown devices learns all of them at once.
//!
//! The rule reads only the commit and the group's current public state, so every replica of a
//! relay group reaches the same verdict from the same log (credential checks aside, which depend
//! on each relay's directory and are made by the relay a device submits to).

use openmls::prelude::*;

use super::{
    AdminPolicy, CONFIG_EXTENSION_TYPE, ChannelConfig, ChannelError, CredentialCheck, UserId,
    check_credential, credential_device, credential_member, first_failure, read_config,
};
use crate::identity::DeviceId;

/// Checks a commit, staged by openmls from a member's PublicMessage, against the channel rules
/// (see the module doc). `config` is the channel's config before the commit, `committer` the
/// sender's credential in the current tree. Returns the committer's device.
pub fn authorize_commit(
    config: &ChannelConfig,
    committer: &Credential,
    staged: &openmls::group::StagedCommit,
    tree: &openmls::group::PublicGroup,
    check: &impl CredentialCheck,
) -> Result<DeviceId, ChannelError> {
    let (device, user) = credential_member(committer).ok_or(ChannelError::LeafMismatch(None))?;
    let admin = is_admin(config, device, &user);
    let own = |credential: &Credential| same_user(config, &user, credential);
    let mut changes_config = false;
    for queued in staged.queued_proposals() {
        if queued.proposal_or_ref_type() != ProposalOrRefType::Proposal {
            return Err(ChannelError::ForbiddenProposal("proposal by reference"));
        }
        match queued.proposal() {
            Proposal::Add(add) => {
                let leaf = add.key_package().leaf_node();
                check_leaf(leaf)?;
                if !admin && !own(leaf.credential()) {
                    return Err(ChannelError::NotAdmin);
                }
            }
            Proposal::Remove(remove) => {
                let removed = tree.leaf(remove.removed()).map(LeafNode::credential);
                if !admin && !removed.is_some_and(own) {
                    return Err(ChannelError::NotAdmin);
                }
            }
            Proposal::GroupContextExtensions(_) if !admin => return Err(ChannelError::NotAdmin),
            Proposal::GroupContextExtensions(_) => changes_config = true,
            other => return Err(ChannelError::ForbiddenProposal(proposal_name(other))),
        }
    }
    if let Some(leaf) = staged.update_path_leaf_node() {
        check_leaf(leaf)?;
        if credential_device(leaf.credential()) != Some(device) {
            return Err(ChannelError::LeafMismatch(Some(device)));
        }
    }
    if changes_config {
        config_change(config, staged.group_context().extensions(), check)?;
    }
    first_failure(
        staged
            .credentials_to_verify()
            .filter(|c| *c != committer)
            .map(|c| check_credential(check, c)),
    )?;
    Ok(device)
}

/// Checks that every member's leaf names the key that signs it (a Welcome's tree, or the tree a
/// relay starts following).
pub fn check_members(members: impl Iterator<Item = Member>) -> Result<(), ChannelError> {
    for member in members {
        names_its_key(&member.credential, &member.signature_key)?;
    }
    Ok(())
}

/// Whether a leaf's credential names `user`, a user at a relay, in a channel that relays
/// order: what lets a member that is not an admin add and remove it. A device alone has no
/// other devices; and in a relay-less channel no relay vouches for an address, so there an
/// address gives nothing.
pub fn same_user(config: &ChannelConfig, user: &UserId, credential: &Credential) -> bool {
    !config.relays.is_empty()
        && user.address().is_some()
        && credential_member(credential).is_some_and(|(_, of)| of == *user)
}

/// Whether `device`, of `user`, may change the membership and the config.
pub fn is_admin(config: &ChannelConfig, device: DeviceId, user: &UserId) -> bool {
    match &config.admins {
        AdminPolicy::AnyMember => true,
        AdminPolicy::Admins(admins) => admins.contains(&device),
        AdminPolicy::Users(admins) => user.address().is_some_and(|a| admins.contains(a)),
    }
}

/// The device a leaf's credential names must be the key that signs the leaf.
pub(super) fn check_leaf(leaf: &LeafNode) -> Result<(), ChannelError> {
    names_its_key(leaf.credential(), leaf.signature_key().as_slice())
}

fn names_its_key(credential: &Credential, signature_key: &[u8]) -> Result<(), ChannelError> {
    let device = credential_device(credential).ok_or(ChannelError::LeafMismatch(None))?;
    if signature_key != device.as_bytes() {
        return Err(ChannelError::LeafMismatch(Some(device)));
    }
    Ok(())
}

/// Checks the config a GroupContextExtensions proposal leaves.
fn config_change(
    old: &ChannelConfig,
    extensions: &Extensions<GroupContext>,
    check: &impl CredentialCheck,
) -> Result<(), ChannelError> {
    for extension in extensions.iter() {
        match extension.extension_type() {
            ExtensionType::RequiredCapabilities => {}
            ExtensionType::Unknown(CONFIG_EXTENSION_TYPE) => {}
            _ => return Err(ChannelError::ForbiddenConfig("an extension other than the config")),
        }
    }
    let required = extensions.required_capabilities().is_some_and(|r| {
        r.extension_types().contains(&ExtensionType::Unknown(CONFIG_EXTENSION_TYPE))
    });
    if !required {
        return Err(ChannelError::ForbiddenConfig("the config capability is no longer required"));
    }
    let new = read_config(extensions)?;
    if new.mime != old.mime {
        return Err(ChannelError::ForbiddenConfig("the MIME type is fixed"));
    }
    if new.creator != old.creator {
        return Err(ChannelError::ForbiddenConfig("the creator is fixed"));
    }
    if new.relays != old.relays {
        if new.relays.is_empty() {
            return Err(ChannelError::ForbiddenConfig("a relay set may not be empty"));
        }
        if new.relays.len() > MAX_RELAYS {
            return Err(ChannelError::ForbiddenConfig("a relay set has at most 64 relays"));
        }
        let mut hosts: Vec<&str> = new.relays.iter().map(|r| r.host.as_str()).collect();
        let mut keys: Vec<_> = new.relays.iter().map(|r| r.key).collect();
        hosts.sort_unstable();
        hosts.dedup();
        keys.sort_unstable();
        keys.dedup();
        if hosts.len() != new.relays.len() || keys.len() != new.relays.len() {
            return Err(ChannelError::ForbiddenConfig("a relay appears twice in the relay set"));
        }
        for relay in new.relays.iter().filter(|r| !old.relays.contains(r)) {
            if crate::identity::check_host(&relay.host).is_err() {
                return Err(ChannelError::ForbiddenConfig("a relay's host is not a host name"));
            }
            check.check_relay(relay).map_err(|reason| ChannelError::Credential {
                device: None,
                reason: format!("relay set: {reason}"),
            })?;
        }
    }
    if matches!(&new.admins, AdminPolicy::Admins(a) if a.is_empty())
        || matches!(&new.admins, AdminPolicy::Users(a) if a.is_empty())
    {
        return Err(ChannelError::ForbiddenConfig("an admin set may not be empty"));
    }
    Ok(())
}

/// The most relays in a channel's relay set.
pub(super) const MAX_RELAYS: usize = crate::ordering::MAX_CERT_SIGNATURES;

fn proposal_name(proposal: &Proposal) -> &'static str {
    match proposal {
        Proposal::Add(_) => "add",
        Proposal::Update(_) => "update proposal",
        Proposal::Remove(_) => "remove",
        Proposal::PreSharedKey(_) => "pre-shared key",
        Proposal::ReInit(_) => "reinit",
        Proposal::ExternalInit(_) => "external init",
        Proposal::GroupContextExtensions(_) => "group context extensions",
        Proposal::SelfRemove => "self remove",
        Proposal::Custom(_) => "custom proposal",
        #[allow(unreachable_patterns)]
        _ => "unknown proposal",
    }
}
